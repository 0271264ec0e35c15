//! Group commit for a single-node ledger.
//!
//! Append requests queue on a bounded channel. One thread drains whatever is queued (up to
//! the batch limits), applies it through [`LedgerState::apply_append`] and writes the result
//! with one synced RocksDB write, then answers every request in the group. Concurrent
//! appends therefore share one fsync. A request is answered only after its write is durable;
//! if the write fails, every request in the group gets the error and the state does not move.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use custody_proto::pb::ledger::AppendResult;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, warn};

use crate::metrics::LedgerMetrics;
use crate::state::{AppendBatch, ApplyError, LedgerState};
use crate::store::Store;

/// Group-commit limits.
#[derive(Debug, Clone, Copy)]
pub struct CommitLimits {
    /// Largest single event.
    pub max_event_bytes: usize,
    /// Most events in one group commit.
    pub max_batch_events: usize,
    /// Most bytes in one group commit.
    pub max_batch_bytes: usize,
    /// Append requests that may wait in the queue.
    pub queue_depth: usize,
}

impl Default for CommitLimits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1 << 20,
            max_batch_events: 8192,
            max_batch_bytes: 16 << 20,
            queue_depth: 4096,
        }
    }
}

/// Why an append was not committed.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum CommitError {
    /// An event was refused; nothing of the request was stored.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed (I/O error, disk full, corruption); nothing of the request was stored.
    #[error("ledger storage failed, events not recorded: {0}")]
    Storage(String),
    /// The committer is shutting down.
    #[error("ledger is shutting down")]
    ShuttingDown,
    /// The queue is full.
    #[error("ledger is overloaded: append queue full")]
    Overloaded,
}

struct Pending {
    events: Vec<Bytes>,
    arrived: Instant,
    reply: oneshot::Sender<Result<Vec<AppendResult>, CommitError>>,
}

/// Handle to the commit thread.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Pending>,
    state: watch::Receiver<LedgerState>,
}

impl Committer {
    /// Starts the commit thread over `store`, beginning at `state`.
    pub fn start(
        store: Arc<Store>,
        state: LedgerState,
        limits: CommitLimits,
        metrics: Arc<LedgerMetrics>,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits.queue_depth);
        let (state_tx, state_rx) = watch::channel(state);
        metrics.size.set(state.next_index as i64);
        let handle = std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || commit_loop(store, state, limits, metrics, rx, state_tx))
            .expect("spawning the commit thread");
        (
            Self {
                tx,
                state: state_rx,
            },
            handle,
        )
    }

    /// Appends `events`; resolves once they are durable, with their results in order.
    pub async fn append(&self, events: Vec<Bytes>) -> Result<Vec<AppendResult>, CommitError> {
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            events,
            arrived: Instant::now(),
            reply,
        };
        match self.tx.try_send(p) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(CommitError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(CommitError::ShuttingDown),
        }
        rx.await.map_err(|_| CommitError::ShuttingDown)?
    }

    /// The last committed state.
    pub fn state(&self) -> LedgerState {
        *self.state.borrow()
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn commit_loop(
    store: Arc<Store>,
    mut state: LedgerState,
    limits: CommitLimits,
    metrics: Arc<LedgerMetrics>,
    mut rx: mpsc::Receiver<Pending>,
    state_tx: watch::Sender<LedgerState>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        let mut events = group[0].events.len();
        let mut bytes: usize = group[0].events.iter().map(|e| e.len()).sum();
        while events < limits.max_batch_events && bytes < limits.max_batch_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    events += p.events.len();
                    bytes += p.events.iter().map(|e| e.len()).sum::<usize>();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let batch = AppendBatch {
            commit_time_ns: now_ns(),
            events: group.iter().flat_map(|p| p.events.iter().cloned()).collect(),
        };
        let outcome = state
            .apply_append(&batch, limits.max_event_bytes, store.as_ref())
            .map_err(|e| match e {
                ApplyError::InvalidEvent { .. } => CommitError::Invalid(e.to_string()),
                ApplyError::Store(s) => CommitError::Storage(s.to_string()),
            })
            .and_then(|applied| {
                store
                    .write(&applied.writes, true)
                    .map_err(|e| CommitError::Storage(e.to_string()))?;
                Ok(applied)
            });
        match outcome {
            Ok(applied) => {
                state = applied.state;
                let _ = state_tx.send(state);
                metrics.size.set(state.next_index as i64);
                metrics.batch_size.observe(batch.events.len() as f64);
                let mut results = applied.results.into_iter();
                for p in group {
                    let mine: Vec<AppendResult> = results.by_ref().take(p.events.len()).collect();
                    let dup = mine.iter().filter(|r| r.duplicate).count() as u64;
                    metrics.events_duplicate.inc_by(dup);
                    metrics.events_appended.inc_by(mine.len() as u64 - dup);
                    metrics.append_latency.observe(p.arrived.elapsed().as_secs_f64());
                    let _ = p.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                match &e {
                    CommitError::Storage(msg) => error!(error = %msg, events = batch.events.len(), "ledger write failed; appends refused"),
                    other => warn!(error = %other, "append batch refused"),
                }
                for p in group {
                    metrics.appends_failed.inc();
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
    if let Err(e) = store.flush() {
        error!(error = %e, "flushing the ledger at shutdown failed");
    }
}
