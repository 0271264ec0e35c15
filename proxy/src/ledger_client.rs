//! The proxy's client for the ledger's `Append` API.
//!
//! Every call has a deadline. Within it, transport failures and `unavailable` answers are
//! retried (rotating through the configured endpoints) with the same bytes; because every
//! event carries its idempotency key, a retry of an append that did commit is reported as a
//! duplicate by the ledger rather than stored twice. When the deadline passes the caller gets
//! [`LedgerError::Unavailable`] and must fail closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use custody_proto::pb::ledger::ledger_client::LedgerClient as Grpc;
use custody_proto::pb::ledger::{AppendRequest, AppendResult, StatusRequest, StatusResponse};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

/// The ledger did not take an append.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LedgerError {
    /// No commit before the deadline (ledger down, partitioned, or too slow). The outcome of
    /// the last attempt is unknown.
    #[error("audit ledger unavailable: {0}")]
    Unavailable(String),
    /// The ledger refused the events as invalid; retrying will not help.
    #[error("audit ledger refused the events: {0}")]
    Rejected(String),
}

/// A handle to the ledger cluster. Cheap to clone.
#[derive(Clone)]
pub struct LedgerClient {
    channels: Arc<Vec<(String, Channel)>>,
    current: Arc<AtomicUsize>,
    timeout: Duration,
}

/// Largest append message sent.
const MAX_MESSAGE: usize = 64 << 20;

impl LedgerClient {
    /// A client for `urls` (e.g. `http://127.0.0.1:7400`). Connections are made lazily.
    pub fn new(urls: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let mut channels = Vec::new();
        for u in urls {
            let ep = Endpoint::from_shared(u.clone())?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            channels.push((u.clone(), ep.connect_lazy()));
        }
        anyhow::ensure!(!channels.is_empty(), "no ledger endpoints configured");
        Ok(Self {
            channels: Arc::new(channels),
            current: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// The per-append deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn grpc(&self) -> (usize, Grpc<Channel>) {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        (
            i,
            Grpc::new(self.channels[i].1.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
    }

    fn rotate(&self, from: usize) {
        let _ = self
            .current
            .compare_exchange(from, (from + 1) % self.channels.len(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Appends `events`, retrying until the deadline. Returns one result per event.
    pub async fn append(&self, events: Vec<Bytes>) -> Result<Vec<AppendResult>, LedgerError> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(20);
        let n = events.len();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(LedgerError::Unavailable(format!(
                    "no commit within {} ms",
                    self.timeout.as_millis()
                )));
            }
            let (i, mut client) = self.grpc();
            let mut req = tonic::Request::new(AppendRequest { events: events.clone() });
            req.set_timeout(remaining);
            let last = match tokio::time::timeout(remaining, client.append(req)).await {
                Ok(Ok(resp)) => {
                    let results = resp.into_inner().results;
                    if results.len() != n {
                        return Err(LedgerError::Rejected(format!(
                            "ledger answered {} results for {n} events",
                            results.len()
                        )));
                    }
                    return Ok(results);
                }
                Ok(Err(status)) => match status.code() {
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                        return Err(LedgerError::Rejected(status.message().to_string()))
                    }
                    _ => format!("{}: {}", self.channels[i].0, status.message()),
                },
                Err(_) => format!("{}: no answer before the deadline", self.channels[i].0),
            };
            debug!(error = %last, "append attempt failed; retrying");
            self.rotate(i);
            let sleep = backoff.min(deadline.saturating_duration_since(Instant::now()));
            if sleep.is_zero() {
                return Err(LedgerError::Unavailable(last));
            }
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            if Instant::now() >= deadline {
                return Err(LedgerError::Unavailable(last));
            }
        }
    }

    /// The ledger's status, for readiness checks.
    pub async fn status(&self) -> Result<StatusResponse, LedgerError> {
        let (i, mut client) = self.grpc();
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        client.status(req).await.map(|r| r.into_inner()).map_err(|s| {
            self.rotate(i);
            LedgerError::Unavailable(format!("{}: {}", self.channels[i].0, s.message()))
        })
    }
}
