//! The `custody.ledger.v1.Ledger` gRPC service: `Append`, `Status`, `RenewLease`, and
//! membership administration, on top of the node's Raft loop.

use std::sync::Arc;
use std::time::Duration;

use custody_proto::pb::ledger::ledger_server::Ledger;
use custody_proto::pb::ledger::{
    AddMemberRequest, AppendRequest, AppendResponse, MembershipResponse, RemoveMemberRequest, RenewLeaseRequest, RenewLeaseResponse, StatusRequest,
    StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::node::{Input, MembershipChange, NodeError, NodeHandle};
use crate::state::validate_event;

/// Metadata key carrying the leader's client address on a not-leader refusal.
pub const LEADER_METADATA: &str = "custody-leader";

/// How long a request waits for its commit before answering "deadline exceeded".
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Limits on what an append may carry.
#[derive(Debug, Clone, Copy)]
pub struct AppendLimits {
    /// Largest single event.
    pub max_event_bytes: usize,
    /// Most events in one request.
    pub max_batch_events: usize,
}

/// Accepts appends from proxies and administration from operators.
#[derive(Clone)]
pub struct LedgerService {
    node_name: Arc<str>,
    cluster_id: Arc<str>,
    data_dir: Arc<str>,
    node: NodeHandle,
    limits: AppendLimits,
    integrity: crate::selfcheck::Integrity,
}

impl LedgerService {
    /// A service in front of `node`.
    pub fn new(node_name: &str, cluster_id: &str, data_dir: &str, node: NodeHandle, limits: AppendLimits) -> Self {
        Self {
            node_name: node_name.into(),
            cluster_id: cluster_id.into(),
            data_dir: data_dir.into(),
            node,
            limits,
            integrity: Default::default(),
        }
    }

    /// Reports the damage `integrity` records in `Status`.
    pub fn with_integrity(mut self, integrity: crate::selfcheck::Integrity) -> Self {
        self.integrity = integrity;
        self
    }
}

/// Maps a node error to a gRPC status a client can act on.
pub fn status_of(e: NodeError) -> Status {
    match &e {
        NodeError::NotLeader { leader_addr, .. } => {
            let mut s = Status::failed_precondition(e.to_string());
            if let Some(a) = leader_addr.as_deref().and_then(|a| MetadataValue::try_from(a).ok()) {
                s.metadata_mut().insert(LEADER_METADATA, a);
            }
            s
        }
        NodeError::Unknown(_) | NodeError::ShuttingDown | NodeError::Busy(_) => Status::unavailable(e.to_string()),
        NodeError::Refused(_) => Status::invalid_argument(e.to_string()),
        NodeError::Overloaded => Status::resource_exhausted(e.to_string()),
        NodeError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
    }
}

#[tonic::async_trait]
impl Ledger for LedgerService {
    async fn append(&self, request: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        let events = request.into_inner().events;
        if events.is_empty() {
            return Ok(Response::new(AppendResponse::default()));
        }
        if events.len() > self.limits.max_batch_events {
            return Err(Status::invalid_argument(format!(
                "batch of {} events exceeds the limit of {}",
                events.len(),
                self.limits.max_batch_events
            )));
        }
        for (i, e) in events.iter().enumerate() {
            validate_event(e, self.limits.max_event_bytes)
                .map_err(|reason| Status::invalid_argument(format!("event {i}: {reason}")))?;
        }
        let n = events.len();
        let results = self.node.append(events, COMMIT_WAIT).await.map_err(status_of)?;
        debug!(events = n, first = results.first().map(|r| r.index), "appended");
        Ok(Response::new(AppendResponse { results }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self.node.status();
        let ledger = st.ledger.unwrap_or_else(crate::state::LedgerState::empty);
        Ok(Response::new(StatusResponse {
            node_id: self.node_name.to_string(),
            size: ledger.next_index,
            head_hash: hex::encode(ledger.head),
            tree_root: st.tree_root.map(hex::encode).unwrap_or_default(),
            data_dir: self.data_dir.to_string(),
            raft_id: st.id,
            cluster_id: self.cluster_id.to_string(),
            role: st.role.clone(),
            term: st.term,
            leader_id: st.leader_id,
            leader_addr: st.leader_addr().unwrap_or_default(),
            commit_index: st.commit,
            applied_index: st.applied,
            members: st.members.clone(),
            log_first_index: st.log_first,
            log_last_index: st.log_last,
            blocks: st.last_block.map_or(0, |b| b.height + 1),
            sealed_size: st.last_block.map_or(0, |b| b.tree_size),
            last_block_hash: st.last_block.map(|b| hex::encode(b.hash())).unwrap_or_default(),
            damage: self.integrity.damage().map(|d| d.to_string()).unwrap_or_default(),
        }))
    }

    async fn renew_lease(&self, request: Request<RenewLeaseRequest>) -> Result<Response<RenewLeaseResponse>, Status> {
        let r = request.into_inner();
        if r.proxy_id.is_empty() || r.proxy_id.len() > crate::state::MAX_ID_LEN || r.instance.is_empty() || r.instance.len() > 128 {
            return Err(Status::invalid_argument("proxy_id (1..=256 bytes) and instance (1..=128 bytes) are required"));
        }
        let ttl = Duration::from_millis(u64::from(r.ttl_ms.clamp(1_000, 600_000)));
        let (expires_ns, abandoned) = self
            .node
            .lease(r.proxy_id, r.instance, ttl, COMMIT_WAIT)
            .await
            .map_err(status_of)?;
        Ok(Response::new(RenewLeaseResponse {
            expires_ns,
            abandoned_sessions: abandoned,
        }))
    }

    async fn add_member(&self, request: Request<AddMemberRequest>) -> Result<Response<MembershipResponse>, Status> {
        let m = request
            .into_inner()
            .member
            .ok_or_else(|| Status::invalid_argument("member is required"))?;
        if m.id == 0 || m.peer_addr.is_empty() || m.client_addr.is_empty() {
            return Err(Status::invalid_argument("a member needs a positive id, a peer address and a client address"));
        }
        let members = self
            .node
            .change_membership(MembershipChange::Add(m), COMMIT_WAIT)
            .await
            .map_err(status_of)?;
        Ok(Response::new(MembershipResponse { members }))
    }

    async fn remove_member(&self, request: Request<RemoveMemberRequest>) -> Result<Response<MembershipResponse>, Status> {
        let id = request.into_inner().id;
        let members = self
            .node
            .change_membership(MembershipChange::Remove(id), COMMIT_WAIT)
            .await
            .map_err(status_of)?;
        Ok(Response::new(MembershipResponse { members }))
    }

    async fn transfer_leader(&self, request: Request<TransferLeaderRequest>) -> Result<Response<TransferLeaderResponse>, Status> {
        let to = request.into_inner().to;
        self.node.send(Input::TransferLeader(to)).map_err(status_of)?;
        Ok(Response::new(TransferLeaderResponse {}))
    }
}
