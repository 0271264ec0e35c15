//! The ledger's Arrow Flight service: `do_get` streams the `events`, `sessions` and `entries`
//! tables for a JSON ticket (see [`crate::table`]); `list_flights`, `get_flight_info` and
//! `get_schema` describe them. `do_action` serves `status`, and the Merkle tree's
//! `inclusion_proof` and `consistency_proof` (hashes in standard base64).

use std::pin::Pin;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::checkpoint::{CheckpointError, CheckpointSigner};
use crate::machine::StoreCell;
use crate::node::NodeHandle;
use crate::scan::{scan, ScanError};
use crate::selfcheck::Integrity;
use crate::state::{LedgerState, StoredTree};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use custody_proto::merkle;
use crate::table::{entries_schema, events_schema, sessions_schema, Table, TicketQuery};

/// How long a linearizable read waits for the leader to confirm the commit index.
const READ_BARRIER: Duration = Duration::from_secs(5);

/// Serves the ledger's tables over Flight.
#[derive(Clone)]
pub struct LedgerFlight {
    store: StoreCell,
    node: NodeHandle,
    signer: SharedSigner,
    integrity: Integrity,
    /// Flight SQL, for descriptors, tickets and actions that are not this service's own.
    sql: Option<std::sync::Arc<crate::sql::LedgerSql>>,
    /// Who may read; `None`: anyone.
    readers: Option<std::sync::Arc<crate::readers::ReaderGate>>,
}

impl std::fmt::Debug for LedgerFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerFlight").finish_non_exhaustive()
    }
}

/// Whether a ticket or command is the documented JSON (or empty: all events) rather than a
/// Flight SQL protobuf message.
fn is_json_ticket(b: &[u8]) -> bool {
    b.iter().find(|c| !c.is_ascii_whitespace()).is_none_or(|c| *c == b'{')
}

/// The node's checkpoint signer, shared by the Flight service and the block signer.
pub type SharedSigner = std::sync::Arc<tokio::sync::Mutex<CheckpointSigner>>;

impl LedgerFlight {
    /// A Flight service over the node's state machine, signing checkpoints with `signer` and
    /// refusing reads of whatever `integrity` records as damaged.
    pub fn new(store: StoreCell, node: NodeHandle, signer: SharedSigner, integrity: Integrity) -> Self {
        let base = Self { store, node, signer, integrity, sql: None, readers: None };
        let sql = crate::sql::LedgerSql::new(base.clone()).ok().map(std::sync::Arc::new);
        Self { sql, ..base }
    }

    /// Requires readers' tokens to pass `gate`.
    pub fn with_readers(mut self, gate: crate::readers::ReaderGate) -> Self {
        self.readers = Some(std::sync::Arc::new(gate));
        self
    }

    /// Records a read of the audit log as an `audit_query` event before it is served, when
    /// readers are authenticated (`[readers]`): who asked and what. A read that cannot be
    /// recorded is refused (fail closed). A follower hands the event to the leader.
    pub(crate) async fn record_query(&self, reader: Option<&custody_proto::Identity>, interface: &str, query: &str) -> Result<(), Status> {
        let Some(reader) = reader else { return Ok(()) };
        use custody_proto::pb::v1::{event, AuditQuery};
        let mut query = query.to_string();
        if query.len() > 64 * 1024 {
            let mut cut = 64 * 1024;
            while !query.is_char_boundary(cut) {
                cut -= 1;
            }
            query.truncate(cut);
        }
        let node = self.node.status().id.to_string();
        let body = event::Body::AuditQuery(AuditQuery { query, interface: interface.into(), node });
        self.append_own(Some(reader), custody_proto::EventKind::AuditQuery, "audit", body)
            .await
            .map(|_| ())
            .map_err(|e| Status::new(e.code(), format!("cannot record this query in the ledger ({}); it is not served", e.message())))
    }

    /// Appends an event the ledger writes about itself (outside any session) and returns
    /// its index: through this node's Raft loop, or handed to the leader by a follower. An
    /// event the log refuses (a second hold on a session) is FAILED_PRECONDITION; a ledger
    /// that cannot take it, UNAVAILABLE.
    async fn append_own(&self, who: Option<&custody_proto::Identity>, kind: custody_proto::EventKind, prefix: &str, body: custody_proto::pb::v1::event::Body) -> Result<u64, Status> {
        use custody_proto::pb::v1::Protocol;
        use prost::Message as _;
        let st = self.node.status();
        let ev = custody_proto::Event {
            proxy_id: format!("ledger-{}", st.id),
            session_id: format!("{prefix}-{}", uuid::Uuid::now_v7()),
            seq: 0,
            proxy_time_ns: crate::node::now_ns(),
            kind: kind as i32,
            identity: who.cloned(),
            protocol: Protocol::Flight as i32,
            body: Some(body),
            ..Default::default()
        };
        let bytes = bytes::Bytes::from(ev.encode_to_vec());
        let results = match self.node.append(vec![bytes.clone()], Duration::from_secs(5)).await {
            Ok(r) => r,
            Err(crate::node::NodeError::NotLeader { leader_addr: Some(addr), .. }) => {
                let mut c = custody_proto::pb::ledger::ledger_client::LedgerClient::connect(format!("http://{addr}"))
                    .await
                    .map_err(|e| Status::unavailable(format!("the leader at {addr}: {e}")))?;
                c.append(custody_proto::pb::ledger::AppendRequest { events: vec![bytes] }).await?.into_inner().results
            }
            Err(crate::node::NodeError::Refused(why)) => return Err(Status::failed_precondition(why)),
            Err(e) => return Err(Status::unavailable(e.to_string())),
        };
        results.first().map(|r| r.index).ok_or_else(|| Status::internal("the ledger returned no result"))
    }

    /// `record_export`: a finished, verified export, as `custody export` reports it.
    async fn record_export(&self, who: Option<&custody_proto::Identity>, req: &serde_json::Value) -> Result<serde_json::Value, Status> {
        let s = |k: &str| req[k].as_str().map(str::to_string).ok_or_else(|| Status::invalid_argument(format!("record_export needs {k:?} (a string)")));
        let n = |k: &str| req[k].as_u64().ok_or_else(|| Status::invalid_argument(format!("record_export needs {k:?} (an integer)")));
        let rec = custody_proto::pb::v1::ExportRecord {
            target: s("target")?,
            manifest: s("manifest")?,
            manifest_sha256: s("manifest_sha256")?,
            checkpoint_size: n("size")?,
            first_height: n("first_height")?,
            last_height: n("last_height")?,
            first_index: n("first_index")?,
            end_index: n("end_index")?,
            rows: n("rows")?,
            node: self.node.status().id.to_string(),
        };
        let ledger = self.ledger_state()?.next_index;
        if rec.target.is_empty() || rec.target.len() > 1024 || rec.manifest.is_empty() || rec.manifest.len() > 1024 || rec.manifest_sha256.len() != 64 {
            return Err(Status::invalid_argument("record_export: target and manifest must be 1..=1024 bytes and manifest_sha256 64 hex digits"));
        }
        if rec.first_index >= rec.end_index || rec.end_index > rec.checkpoint_size || rec.checkpoint_size > ledger || rec.first_height > rec.last_height {
            return Err(Status::invalid_argument(format!(
                "record_export: entries {}..{} in a checkpoint of size {} do not fit this ledger of {ledger} entries",
                rec.first_index, rec.end_index, rec.checkpoint_size
            )));
        }
        let index = self
            .append_own(who, custody_proto::EventKind::Export, "export", custody_proto::pb::v1::event::Body::ExportRecord(rec))
            .await
            .map_err(|e| Status::new(e.code(), format!("cannot record the export in the ledger: {}", e.message())))?;
        Ok(serde_json::json!({"index": index}))
    }

    /// `legal_hold`: places (or with `"release": true` releases) a hold on a session.
    async fn legal_hold(&self, who: Option<&custody_proto::Identity>, req: &serde_json::Value) -> Result<serde_json::Value, Status> {
        let session_id = req["session_id"].as_str().filter(|s| !s.is_empty() && s.len() <= crate::state::MAX_ID_LEN).ok_or_else(|| Status::invalid_argument("legal_hold needs \"session_id\""))?;
        let released = req["release"].as_bool().unwrap_or(false);
        let reason = req["reason"].as_str().unwrap_or("").to_string();
        // No control, bidirectional-override or line-separator characters: a reason is shown to
        // people as written.
        let shady = |c: char| c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if !released && (reason.trim().is_empty() || reason.len() > 4096 || reason.chars().any(shady)) {
            return Err(Status::invalid_argument("legal_hold needs a \"reason\" (1..=4096 bytes, no control, bidi or line-separator characters): who asked for it and why"));
        }
        let store = self.store.get();
        let known = store.get(crate::store::cf::SESSIONS, session_id.as_bytes()).map_err(|e| Status::internal(e.to_string()))?.is_some();
        if !known {
            return Err(Status::not_found(format!("no session {session_id:?} in this ledger")));
        }
        let held = crate::state::is_held(&store, session_id).map_err(|e| Status::internal(e.to_string()))?;
        if released && !held {
            return Err(Status::failed_precondition(format!("session {session_id} is not under a legal hold")));
        }
        if !released && held {
            let why = store.get(crate::store::cf::META, &crate::state::hold_key(session_id)).ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
            return Err(Status::already_exists(format!("session {session_id} is already under a legal hold ({why}); one hold per session, released with --release")));
        }
        // Retention moves forward only: entries pruned before the hold stay pruned (their
        // payloads are in the archive), and say so.
        let pruned_before = !released && {
            let prefix = crate::state::by_session_key(session_id, 0);
            let prefix = &prefix[..prefix.len() - 8];
            let keys = store.keys_with_prefix(crate::store::cf::BY_SESSION, prefix).map_err(|e| Status::internal(e.to_string()))?;
            let mut any = false;
            for k in keys {
                let k = k.map_err(|e| Status::internal(e.to_string()))?;
                let Ok(i) = crate::store::u64_key(&k[k.len().saturating_sub(8)..]) else { continue };
                if store.entry(i).ok().flatten().is_some_and(|b| custody_proto::entry::is_pruned(&b)) {
                    any = true;
                    break;
                }
            }
            any
        };
        let body = custody_proto::pb::v1::event::Body::LegalHold(custody_proto::pb::v1::LegalHold { session_id: session_id.into(), reason, released });
        let index = self
            .append_own(who, custody_proto::EventKind::LegalHold, "hold", body)
            .await
            .map_err(|e| Status::new(e.code(), format!("cannot record the legal hold in the ledger: {}", e.message())))?;
        Ok(serde_json::json!({"index": index, "session_id": session_id, "held": !released, "pruned_before_hold": pruned_before}))
    }

    /// The reader of a request (`None` when reads are open), or the refusal.
    async fn reader(&self, md: &tonic::metadata::MetadataMap) -> Result<Option<custody_proto::Identity>, Status> {
        match &self.readers {
            None => Ok(None),
            Some(g) => g.check(md).await.map(Some),
        }
    }

    fn sql(&self) -> Result<&crate::sql::LedgerSql, Status> {
        self.sql.as_deref().ok_or_else(|| Status::unimplemented("Flight SQL is not available on this node"))
    }

    /// The linearizable read barrier, for Flight SQL scans.
    pub(crate) async fn read_barrier_for_sql(&self) -> Result<(), Status> {
        self.read_barrier(None).await
    }

    /// What a scan reads: one store, its size, and the damage to refuse.
    pub(crate) fn scan_inputs(&self) -> Result<(std::sync::Arc<crate::store::Store>, u64, Option<crate::selfcheck::Damage>), Status> {
        let store = self.store.get();
        let size = LedgerState::recorded(&store).map_err(|e| Status::internal(e.to_string()))?.map_or(0, |s| s.next_index);
        Ok((store, size, self.integrity.damage()))
    }

    /// Refuses a read that needs entries up to `end` (exclusive) if they are damaged here.
    fn intact(&self, end: u64) -> Result<(), Status> {
        self.integrity.check_range(end).map_err(|d| Status::data_loss(format!("{d}; read from another ledger node")))
    }

    /// Signs the checkpoint at the size asked (default: the last block's, or the tree's size
    /// before the first block) with this node's key.
    async fn checkpoint(&self, req: &serde_json::Value) -> Result<serde_json::Value, Status> {
        let store = self.store.get();
        let ledger = Self::tree_size(&store)?;
        let sealed = self.node.status().last_block.map(|b| b.tree_size).filter(|s| *s <= ledger);
        let size = match (&req["size"], sealed) {
            (serde_json::Value::Null, Some(s)) => s,
            _ => self.proof_size(req, "size", ledger)?,
        };
        self.intact(size)?;
        let signer = self.signer.clone();
        let note = tokio::task::spawn_blocking(move || {
            let mut signer = signer.blocking_lock();
            let note = signer.sign(&StoredTree(store.as_ref()), size);
            (note, signer.verifier().to_string(), signer.origin().to_string())
        })
        .await
        .map_err(|e| Status::internal(format!("signing task: {e}")))?;
        let (note, verifier_key, origin) = note;
        let note = note.map_err(|e| match e {
            CheckpointError::Inconsistent { .. } => Status::failed_precondition(e.to_string()),
            other => Status::internal(other.to_string()),
        })?;
        Ok(serde_json::json!({
            "size": size,
            "note": note.encode(),
            "verifier_key": verifier_key,
            "origin": origin,
        }))
    }

    /// Waits until this node may serve a read: by default every write committed before the
    /// read began is applied here (Raft ReadIndex, confirmed by a quorum); with
    /// `max_staleness_ms`, this node heard from the leader that recently.
    async fn read_barrier(&self, max_staleness_ms: Option<u64>) -> Result<(), Status> {
        match max_staleness_ms {
            None => self.node.read_index(READ_BARRIER).await.map(|_| ()).map_err(|e| {
                Status::unavailable(format!(
                    "cannot confirm this read is current ({e}); retry, or ask the leader, or pass \"max_staleness_ms\" in the ticket to read this node's possibly stale copy"
                ))
            }),
            Some(ms) => {
                let st = self.node.status();
                match st.leader_contact {
                    Some(t) if t.elapsed() <= Duration::from_millis(ms) => Ok(()),
                    Some(t) => Err(Status::unavailable(format!(
                        "this node last heard from the leader {} ms ago, more than max_staleness_ms = {ms}",
                        t.elapsed().as_millis()
                    ))),
                    None => Err(Status::unavailable("this node has not heard from a leader since it started")),
                }
            }
        }
    }

    /// The size a proof is asked at: given, at most the ledger's, and defaulting to it.
    fn proof_size(&self, v: &serde_json::Value, field: &str, ledger: u64) -> Result<u64, Status> {
        match &v[field] {
            serde_json::Value::Null => Ok(ledger),
            n => match n.as_u64() {
                Some(n) if n <= ledger => Ok(n),
                Some(n) => Err(Status::out_of_range(format!("{field} {n} is beyond the ledger's size {ledger}"))),
                None => Err(Status::invalid_argument(format!("{field} must be a non-negative integer"))),
            },
        }
    }

    /// The ledger size whose tree `store` fully holds (the same store for size and nodes: a
    /// snapshot install may swap the cell between two reads).
    fn tree_size(store: &crate::store::Store) -> Result<u64, Status> {
        let ledger = LedgerState::recorded(store).map_err(|e| Status::internal(e.to_string()))?.map_or(0, |s| s.next_index);
        let tree = crate::state::stored_tree_size(store, ledger).map_err(|e| Status::data_loss(e.to_string()))?;
        if tree < ledger {
            return Err(Status::unavailable(format!("the Merkle tree is being rebuilt ({tree} of {ledger} entries); retry")));
        }
        Ok(ledger)
    }

    /// The store and the tree size a proof is asked at (`field` of `req`), checked to be held
    /// whole and undamaged here.
    fn proof_tree(&self, req: &serde_json::Value, field: &str) -> Result<(std::sync::Arc<crate::store::Store>, u64), Status> {
        let store = self.store.get();
        let ledger = Self::tree_size(&store)?;
        let size = self.proof_size(req, field, ledger)?;
        self.intact(size)?;
        Ok((store, size))
    }

    fn inclusion(&self, req: &serde_json::Value) -> Result<serde_json::Value, Status> {
        let (store, size) = self.proof_tree(req, "size")?;
        let index = req["index"].as_u64().ok_or_else(|| Status::invalid_argument("index must be a non-negative integer"))?;
        let tree = StoredTree(store.as_ref());
        let proof = merkle::inclusion_proof(&tree, index, size).map_err(tree_status)?;
        let root = merkle::root(&tree, size).map_err(|e| Status::data_loss(e.to_string()))?;
        let entry = store.entry(index).map_err(|e| Status::data_loss(e.to_string()))?.ok_or_else(|| Status::data_loss(format!("entry {index} is missing")))?;
        Ok(serde_json::json!({
            "index": index,
            "size": size,
            "root": B64.encode(root),
            "leaf_hash": B64.encode(custody_proto::entry::stored_leaf(&entry)),
            "entry": B64.encode(&entry),
            "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
        }))
    }

    /// Inclusion proofs of many entries in one tree: `{"indices": [...], "size": N}`, at most
    /// 1000 indices.
    fn inclusions(&self, req: &serde_json::Value) -> Result<serde_json::Value, Status> {
        let (store, size) = self.proof_tree(req, "size")?;
        let indices = req["indices"].as_array().ok_or_else(|| Status::invalid_argument("indices must be an array of entry indices"))?;
        if indices.len() > 1000 {
            return Err(Status::invalid_argument(format!("at most 1000 indices per request, got {}", indices.len())));
        }
        let tree = StoredTree(store.as_ref());
        let root = merkle::root(&tree, size).map_err(|e| Status::data_loss(e.to_string()))?;
        let mut proofs = Vec::with_capacity(indices.len());
        for i in indices {
            let index = i.as_u64().ok_or_else(|| Status::invalid_argument("indices must be non-negative integers"))?;
            let proof = merkle::inclusion_proof(&tree, index, size).map_err(tree_status)?;
            let entry = store.entry(index).map_err(|e| Status::data_loss(e.to_string()))?.ok_or_else(|| Status::data_loss(format!("entry {index} is missing")))?;
            proofs.push(serde_json::json!({
                "index": index,
                "entry": B64.encode(&entry),
                "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
            }));
        }
        Ok(serde_json::json!({ "size": size, "root": B64.encode(root), "proofs": proofs }))
    }

    fn consistency(&self, req: &serde_json::Value) -> Result<serde_json::Value, Status> {
        let (store, second) = self.proof_tree(req, "second")?;
        let first = req["first"].as_u64().ok_or_else(|| Status::invalid_argument("first must be a non-negative integer"))?;
        let tree = StoredTree(store.as_ref());
        let proof = merkle::consistency_proof(&tree, first, second).map_err(tree_status)?;
        let r = |n| merkle::root(&tree, n).map_err(|e| Status::data_loss(e.to_string()));
        Ok(serde_json::json!({
            "first": first,
            "second": second,
            "first_root": B64.encode(r(first.min(second))?),
            "second_root": B64.encode(r(second)?),
            "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
        }))
    }

    /// Block headers from `from` (height, default 0), at most `limit` (default and most 10000),
    /// up to the damaged range if there is one.
    fn blocks(&self, req: &serde_json::Value) -> Result<serde_json::Value, Status> {
        if !(req.is_object() || req.is_null()) {
            return Err(Status::invalid_argument("the blocks body must be a JSON object such as {\"from\": 0, \"limit\": 100}"));
        }
        let int = |field: &str, default: u64| match &req[field] {
            serde_json::Value::Null => Ok(default),
            v => v.as_u64().ok_or_else(|| Status::invalid_argument(format!("{field} must be a non-negative integer"))),
        };
        let from = int("from", 0)?;
        let limit = int("limit", 10_000)?.min(10_000) as usize;
        let store = self.store.get();
        let mut out = Vec::new();
        let damaged = self.integrity.damage();
        for r in store.blocks_from(from).map_err(|e| Status::internal(e.to_string()))?.take(limit) {
            let (height, bytes) = r.map_err(|e| Status::internal(e.to_string()))?;
            let b = custody_proto::block::BlockHeader::decode(&bytes).map_err(|e| Status::data_loss(format!("block {height}: {e}")))?;
            if let Some(d) = &damaged {
                if b.tree_size > d.from_index {
                    break;
                }
            }
            out.push(serde_json::json!({
                "height": b.height,
                "first_index": b.first_index,
                "count": b.count,
                "tree_size": b.tree_size,
                "root": B64.encode(b.root),
                "prev_hash": B64.encode(b.prev_hash),
                "sealed_at_ns": b.sealed_at_ns,
                "hash": B64.encode(b.hash()),
                "header": B64.encode(b.encode()),
            }));
        }
        Ok(serde_json::json!({ "blocks": out }))
    }

    fn ledger_state(&self) -> Result<LedgerState, Status> {
        LedgerState::recorded(&self.store.get())
            .map_err(|e| Status::internal(e.to_string()))
            .map(|s| s.unwrap_or_else(LedgerState::empty))
    }
}

fn tree_status(e: merkle::TreeError<crate::store::StoreError>) -> Status {
    match e {
        merkle::TreeError::Range(m) => Status::out_of_range(m),
        merkle::TreeError::Source(e) => Status::data_loss(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn schema_of(t: Table) -> SchemaRef {
    match t {
        Table::Events => events_schema(),
        Table::Sessions => sessions_schema(),
        Table::Entries => entries_schema(),
    }
}

fn table_name(t: Table) -> &'static str {
    match t {
        Table::Events => "events",
        Table::Sessions => "sessions",
        Table::Entries => "entries",
    }
}

/// Resolves a descriptor: a path `["events"]`, or a command holding a JSON ticket.
fn query_of(d: &FlightDescriptor) -> Result<TicketQuery, Status> {
    match DescriptorType::try_from(d.r#type) {
        Ok(DescriptorType::Path) => {
            let name = d.path.first().map(String::as_str).unwrap_or("events");
            let table = match name {
                "events" => Table::Events,
                "sessions" => Table::Sessions,
                "entries" => Table::Entries,
                other => {
                    return Err(Status::not_found(format!(
                        "no table {other:?}; tables are events, sessions, entries"
                    )))
                }
            };
            Ok(TicketQuery {
                table,
                ..Default::default()
            })
        }
        Ok(DescriptorType::Cmd) => TicketQuery::parse(&d.cmd).map_err(Status::invalid_argument),
        _ => Err(Status::invalid_argument("descriptor must be a path or a command")),
    }
}

fn flight_info(q: &TicketQuery, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
    let ticket = serde_json::to_vec(q).map_err(|e| Status::internal(e.to_string()))?;
    let info = FlightInfo::new()
        .try_with_schema(&schema_of(q.table))
        .map_err(|e| Status::internal(e.to_string()))?
        .with_descriptor(descriptor)
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_ordered(true);
    Ok(info)
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlightService for LedgerFlight {
    type HandshakeStream = Stream<HandshakeResponse>;
    type ListFlightsStream = Stream<FlightInfo>;
    type DoGetStream = Stream<FlightData>;
    type DoPutStream = Stream<PutResult>;
    type DoExchangeStream = Stream<FlightData>;
    type DoActionStream = Stream<arrow_flight::Result>;
    type ListActionsStream = Stream<ActionType>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Ok(Response::new(Box::pin(stream::once(async {
            Ok(HandshakeResponse::default())
        }))))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let infos: Vec<Result<FlightInfo, Status>> = [Table::Events, Table::Sessions, Table::Entries]
            .into_iter()
            .map(|t| {
                let q = TicketQuery {
                    table: t,
                    ..Default::default()
                };
                flight_info(&q, FlightDescriptor::new_path(vec![table_name(t).to_string()]))
            })
            .collect();
        Ok(Response::new(Box::pin(stream::iter(infos))))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.reader(request.metadata()).await?;
        if request.get_ref().r#type == DescriptorType::Cmd as i32 && !is_json_ticket(&request.get_ref().cmd) {
            return FlightService::get_flight_info(self.sql()?, request).await;
        }
        let d = request.into_inner();
        let q = query_of(&d)?;
        Ok(Response::new(flight_info(&q, d)?))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("poll_flight_info: use get_flight_info"))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.reader(request.metadata()).await?;
        if request.get_ref().r#type == DescriptorType::Cmd as i32 && !is_json_ticket(&request.get_ref().cmd) {
            return FlightService::get_schema(self.sql()?, request).await;
        }
        let q = query_of(&request.into_inner())?;
        let schema = schema_of(q.table);
        let r: SchemaResult = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(r))
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let reader = self.reader(request.metadata()).await?;
        if let Some(r) = &reader {
            info!(reader = %r.subject, issuer = %r.issuer, "audit log read");
        }
        if !is_json_ticket(&request.get_ref().ticket) {
            // Flight SQL records the statement itself, once it knows its text.
            let mut request = request;
            if let Some(r) = reader {
                request.extensions_mut().insert(crate::sql::Reader(r));
            }
            return FlightService::do_get(self.sql()?, request).await;
        }
        self.record_query(reader.as_ref(), "ticket", &String::from_utf8_lossy(&request.get_ref().ticket)).await?;
        let q = TicketQuery::parse(&request.get_ref().ticket).map_err(Status::invalid_argument)?;
        info!(table = table_name(q.table), ?q, "flight do_get");
        self.read_barrier(q.max_staleness_ms).await?;
        let (tx, rx) = mpsc::channel::<Result<arrow::array::RecordBatch, FlightError>>(2);
        let store = self.store.get();
        let size = self.ledger_state()?.next_index;
        let schema = schema_of(q.table);
        let damage = self.integrity.damage();
        tokio::task::spawn_blocking(move || {
            let r = scan(&store, size, &q, damage.as_ref(), |batch| tx.blocking_send(Ok(batch)).is_ok());
            if let Err(e) = r {
                warn!(error = %e, "flight scan failed");
                let status = match &e {
                    ScanError::Corrupt { .. } | ScanError::Damaged(_) => Status::data_loss(e.to_string()),
                    ScanError::Store(_) => Status::internal(e.to_string()),
                };
                let _ = tx.blocking_send(Err(FlightError::Tonic(Box::new(status))));
            }
        });
        let batches = tokio_stream::wrappers::ReceiverStream::new(rx);
        let encoded = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(|e| match e {
                FlightError::Tonic(s) => *s,
                other => Status::internal(other.to_string()),
            });
        Ok(Response::new(encoded.boxed()))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::permission_denied(
            "the audit ledger is append-only through the proxy; do_put is not accepted",
        ))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange is not supported"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        // Proofs of inclusion carry an entry's bytes (a read of the log, recorded as one);
        // prepared statements plan a query (recorded when it runs).
        match request.get_ref().r#type.as_str() {
            t @ ("inclusion_proof" | "inclusion_proofs") => {
                let reader = self.reader(request.metadata()).await?;
                let what = format!("{t} {}", String::from_utf8_lossy(&request.get_ref().body));
                self.record_query(reader.as_ref(), "proof", &what).await?;
            }
            "CreatePreparedStatement" | "ClosePreparedStatement" => {
                self.reader(request.metadata()).await?;
            }
            t @ ("record_export" | "legal_hold" | "legal_holds") => {
                let who = self.reader(request.metadata()).await?;
                let req: serde_json::Value = if request.get_ref().body.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_slice(&request.get_ref().body).map_err(|e| Status::invalid_argument(format!("the action body must be JSON: {e}")))?
                };
                self.read_barrier(None).await?;
                let body = match t {
                    "record_export" => self.record_export(who.as_ref(), &req).await?,
                    "legal_hold" => self.legal_hold(who.as_ref(), &req).await?,
                    _ => {
                        self.record_query(who.as_ref(), "action", "legal_holds").await?;
                        let holds = crate::state::legal_holds(&self.store.get()).map_err(|e| Status::internal(e.to_string()))?;
                        serde_json::json!({"holds": holds.iter().map(|(s, r)| serde_json::json!({"session_id": s, "reason": r})).collect::<Vec<_>>()})
                    }
                };
                let r = arrow_flight::Result::new(body.to_string());
                return Ok(Response::new(Box::pin(stream::once(async { Ok(r) }))));
            }
            _ => {}
        }
        let action = request.into_inner();
        match action.r#type.as_str() {
            "status" => {
                let staleness = serde_json::from_slice::<serde_json::Value>(&action.body)
                    .ok()
                    .and_then(|v| v["max_staleness_ms"].as_u64());
                self.read_barrier(staleness).await?;
                // Size, head and root from one store.
                let store = self.store.get();
                let st = LedgerState::recorded(&store).map_err(|e| Status::internal(e.to_string()))?.unwrap_or_else(LedgerState::empty);
                Self::tree_size(&store)?;
                let root = merkle::root(&StoredTree(store.as_ref()), st.next_index).map_err(|e| Status::data_loss(e.to_string()))?;
                let node = self.node.status();
                let (verifier_key, retired_keys) = {
                    let s = self.signer.lock().await;
                    (s.verifier().to_string(), s.retired().iter().map(|k| k.to_string()).collect::<Vec<_>>())
                };
                let damage = self.integrity.damage();
                let body = serde_json::json!({
                    "verifier_key": verifier_key,
                    "retired_keys": retired_keys,
                    "blocks": node.last_block.map_or(0, |b| b.height + 1),
                    "sealed_size": node.last_block.map_or(0, |b| b.tree_size),
                    "damage": damage.as_ref().map(|d| serde_json::json!({"from_index": d.from_index, "reason": d.reason})),
                    "members": node.members.iter().map(|m| serde_json::json!({"id": m.id, "flight": format!("grpc://{}", m.client_addr)})).collect::<Vec<_>>(),
                    "size": st.next_index,
                    "head_hash": hex::encode(st.head),
                    "tree_root": B64.encode(root),
                    "last_commit_ns": st.last_commit_ns,
                    "raft_id": node.id,
                    "role": node.role,
                    "term": node.term,
                    "leader_id": node.leader_id,
                    "applied_index": node.applied,
                    "pruned_through": crate::state::pruned_through(&store).map_err(|e| Status::internal(e.to_string()))?,
                    "legal_holds": crate::state::legal_holds(&store).map_err(|e| Status::internal(e.to_string()))?.len(),
                });
                let r = arrow_flight::Result::new(body.to_string());
                Ok(Response::new(Box::pin(stream::once(async { Ok(r) }))))
            }
            "checkpoint" => {
                let req: serde_json::Value = if action.body.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_slice(&action.body).map_err(|e| Status::invalid_argument(format!("the action body must be JSON: {e}")))?
                };
                self.read_barrier(req["max_staleness_ms"].as_u64()).await?;
                let body = self.checkpoint(&req).await?;
                let r = arrow_flight::Result::new(body.to_string());
                Ok(Response::new(Box::pin(stream::once(async { Ok(r) }))))
            }
            "blocks" => {
                let req: serde_json::Value = if action.body.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_slice(&action.body).map_err(|e| Status::invalid_argument(format!("the action body must be JSON: {e}")))?
                };
                self.read_barrier(req["max_staleness_ms"].as_u64()).await?;
                let body = self.blocks(&req)?;
                let r = arrow_flight::Result::new(body.to_string());
                Ok(Response::new(Box::pin(stream::once(async { Ok(r) }))))
            }
            "inclusion_proof" | "inclusion_proofs" | "consistency_proof" => {
                let req: serde_json::Value = serde_json::from_slice(&action.body)
                    .map_err(|e| Status::invalid_argument(format!("the action body must be JSON: {e}")))?;
                self.read_barrier(req["max_staleness_ms"].as_u64()).await?;
                let body = match action.r#type.as_str() {
                    "inclusion_proof" => self.inclusion(&req)?,
                    "inclusion_proofs" => self.inclusions(&req)?,
                    _ => self.consistency(&req)?,
                };
                let r = arrow_flight::Result::new(body.to_string());
                Ok(Response::new(Box::pin(stream::once(async { Ok(r) }))))
            }
            // Flight SQL's own actions (prepared statements).
            "CreatePreparedStatement" | "ClosePreparedStatement" => FlightService::do_action(self.sql()?, Request::new(action)).await,
            other => Err(Status::invalid_argument(format!(
                "unknown action {other:?}; actions: status, checkpoint, blocks, inclusion_proof, inclusion_proofs, consistency_proof, record_export, legal_hold, legal_holds, and Flight SQL's CreatePreparedStatement, ClosePreparedStatement"
            ))),
        }
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        let actions = [
            ("status", "ledger size, chain head and Merkle root as JSON"),
            ("checkpoint", "{\"size\": N} (optional): the C2SP checkpoint of the tree at N, signed by this node's key, with its verifier key"),
            ("blocks", "{\"from\": H, \"limit\": N} (optional): block headers from height H, with their canonical bytes"),
            ("inclusion_proof", "{\"index\": I, \"size\": N}: the RFC 6962 inclusion proof of entry I in the tree of size N, with the entry's canonical bytes"),
            ("inclusion_proofs", "{\"indices\": [I, ...], \"size\": N}: inclusion proofs of up to 1000 entries in the tree of size N, with their canonical bytes"),
            ("consistency_proof", "{\"first\": M, \"second\": N}: the RFC 6962 consistency proof between the trees of sizes M and N"),
            ("record_export", "a finished, verified export (custody export): target, manifest, manifest_sha256, size, first/last_height, first_index, end_index, rows"),
            ("legal_hold", "{\"session_id\": S, \"reason\": R} places a legal hold on a session (its payloads are never pruned); {\"release\": true} releases it"),
            ("legal_holds", "the sessions under a legal hold, with reasons"),
        ]
        .map(|(t, d)| Ok(ActionType { r#type: t.into(), description: d.into() }));
        Ok(Response::new(Box::pin(stream::iter(actions))))
    }
}

/// Keeps `BoxStream` in scope for implementors that want it.
pub type BoxedBatches = BoxStream<'static, Result<FlightData, Status>>;
