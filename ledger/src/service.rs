//! The `custody.ledger.v1.Ledger` gRPC service: `Append` and `Status`.

use std::sync::Arc;

use custody_proto::pb::ledger::ledger_server::Ledger;
use custody_proto::pb::ledger::{AppendRequest, AppendResponse, StatusRequest, StatusResponse};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::committer::{CommitError, CommitLimits, Committer};
use crate::state::validate_event;

/// Accepts appends from proxies.
#[derive(Clone)]
pub struct LedgerService {
    node_id: Arc<str>,
    data_dir: Arc<str>,
    committer: Committer,
    limits: CommitLimits,
}

impl LedgerService {
    /// A service appending through `committer`.
    pub fn new(node_id: &str, data_dir: &str, committer: Committer, limits: CommitLimits) -> Self {
        Self {
            node_id: node_id.into(),
            data_dir: data_dir.into(),
            committer,
            limits,
        }
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
        let results = self.committer.append(events).await.map_err(|e| match e {
            CommitError::Invalid(m) => Status::invalid_argument(m),
            CommitError::Overloaded => Status::resource_exhausted(e.to_string()),
            CommitError::Storage(_) | CommitError::ShuttingDown => Status::unavailable(e.to_string()),
        })?;
        debug!(events = n, first = results.first().map(|r| r.index), "appended");
        Ok(Response::new(AppendResponse { results }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self.committer.state();
        Ok(Response::new(StatusResponse {
            node_id: self.node_id.to_string(),
            size: st.next_index,
            head_hash: hex::encode(st.head),
            data_dir: self.data_dir.to_string(),
        }))
    }
}
