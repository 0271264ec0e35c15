//! The proxy's client for the ledger cluster's `Append` and `RenewLease` API.
//!
//! Every call has a deadline. Within it, transport failures and `unavailable` answers are
//! retried (rotating through the configured endpoints) with the same bytes; because every
//! event carries its idempotency key, a retry of an append that did commit is reported as a
//! duplicate by the ledger rather than stored twice. When the deadline passes the caller gets
//! [`LedgerError::Unavailable`] and must fail closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use custody_proto::pb::ledger::ledger_client::LedgerClient as Grpc;
use custody_proto::pb::ledger::{AppendRequest, AppendResult, RenewLeaseRequest, StatusRequest, StatusResponse};
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
///
/// It knows the configured endpoints and learns the leader: a node that is not the leader
/// answers `FAILED_PRECONDITION` with the leader's address in the `custody-leader` metadata,
/// and the next attempt goes there. Without a known leader it rotates through the endpoints
/// with a short back-off, so an election costs one deadline at most.
#[derive(Clone)]
pub struct LedgerClient {
    channels: Arc<RwLock<Vec<(String, Channel)>>>,
    current: Arc<AtomicUsize>,
    timeout: Duration,
}

/// Largest append message sent.
const MAX_MESSAGE: usize = 64 << 20;
/// Metadata key the ledger puts the leader's address under.
const LEADER_METADATA: &str = "custody-leader";

fn channel(url: &str) -> anyhow::Result<Channel> {
    let ep = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(ep.connect_lazy())
}

fn url_of(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// What one attempt taught us.
enum Attempt<T> {
    Done(T),
    Rejected(String),
    /// Try the leader at this endpoint index next, at once.
    Redirect(usize),
    Retry(String),
}

impl LedgerClient {
    /// A client for `urls` (e.g. `http://127.0.0.1:7400`). Connections are made lazily.
    pub fn new(urls: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let mut channels = Vec::new();
        for u in urls {
            channels.push((url_of(u), channel(&url_of(u))?));
        }
        anyhow::ensure!(!channels.is_empty(), "no ledger endpoints configured");
        Ok(Self {
            channels: Arc::new(RwLock::new(channels)),
            current: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// The per-append deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn grpc(&self) -> (usize, String, Grpc<Channel>) {
        let chans = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let i = self.current.load(Ordering::Relaxed) % chans.len();
        (
            i,
            chans[i].0.clone(),
            Grpc::new(chans[i].1.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
    }

    fn rotate(&self, from: usize) {
        let n = self.channels.read().unwrap_or_else(|p| p.into_inner()).len();
        let _ = self
            .current
            .compare_exchange(from, (from + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The index of `addr`'s channel, adding one for a leader not in the config.
    fn endpoint_for(&self, addr: &str) -> Option<usize> {
        let url = url_of(addr);
        if let Some(i) = self.channels.read().unwrap_or_else(|p| p.into_inner()).iter().position(|(u, _)| *u == url) {
            return Some(i);
        }
        let ch = channel(&url).ok()?;
        let mut chans = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if chans.len() >= 64 {
            return None;
        }
        chans.push((url, ch));
        Some(chans.len() - 1)
    }

    fn classify<T>(&self, endpoint: &str, status: tonic::Status) -> Attempt<T> {
        match status.code() {
            tonic::Code::InvalidArgument => Attempt::Rejected(status.message().to_string()),
            tonic::Code::FailedPrecondition => {
                match status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).and_then(|a| self.endpoint_for(a)) {
                    Some(i) => Attempt::Redirect(i),
                    None => Attempt::Retry(format!("{endpoint}: {}", status.message())),
                }
            }
            _ => Attempt::Retry(format!("{endpoint}: {}", status.message())),
        }
    }

    async fn with_retries<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, LedgerError>
    where
        F: FnMut(Grpc<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("no attempt made");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(LedgerError::Unavailable(format!("no {what} within {} ms; last error: {last}", self.timeout.as_millis())));
            }
            let (i, endpoint, client) = self.grpc();
            let outcome = match tokio::time::timeout(remaining, attempt(client, remaining)).await {
                Ok(Ok(v)) => Attempt::Done(v),
                Ok(Err(status)) => self.classify(&endpoint, status),
                Err(_) => Attempt::Retry(format!("{endpoint}: no answer before the deadline")),
            };
            match outcome {
                Attempt::Done(v) => return Ok(v),
                Attempt::Rejected(m) => return Err(LedgerError::Rejected(m)),
                Attempt::Redirect(to) => {
                    debug!(from = %endpoint, to, "ledger redirected to its leader");
                    self.current.store(to, Ordering::Relaxed);
                    continue;
                }
                Attempt::Retry(m) => {
                    debug!(error = %m, "{what} attempt failed; retrying");
                    last = m;
                    self.rotate(i);
                }
            }
            let sleep = backoff.min(deadline.saturating_duration_since(Instant::now()));
            if sleep.is_zero() {
                return Err(LedgerError::Unavailable(last));
            }
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(Duration::from_millis(250));
        }
    }

    /// Appends `events`, retrying (with the same bytes) until the deadline. Returns one result
    /// per event, after the cluster committed them.
    pub async fn append(&self, events: Vec<Bytes>) -> Result<Vec<AppendResult>, LedgerError> {
        let n = events.len();
        let results = self
            .with_retries("commit", |mut client, remaining| {
                let mut req = tonic::Request::new(AppendRequest { events: events.clone() });
                req.set_timeout(remaining);
                async move { client.append(req).await.map(|r| r.into_inner().results) }
            })
            .await?;
        if results.len() != n {
            return Err(LedgerError::Rejected(format!("ledger answered {} results for {n} events", results.len())));
        }
        Ok(results)
    }

    /// Takes or renews this proxy run's lease; returns its expiry (ledger time, unix ns) and
    /// how many sessions of an earlier run the ledger closed.
    pub async fn renew_lease(&self, proxy_id: &str, instance: &str, ttl: Duration) -> Result<(i64, u32), LedgerError> {
        let req = RenewLeaseRequest {
            proxy_id: proxy_id.to_string(),
            instance: instance.to_string(),
            ttl_ms: ttl.as_millis().min(u32::MAX as u128) as u32,
        };
        self.with_retries("lease renewal", |mut client, remaining| {
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(remaining);
            async move { client.renew_lease(r).await.map(|r| r.into_inner()) }
        })
        .await
        .map(|r| (r.expires_ns, r.abandoned_sessions))
    }

    /// The ledger's status, for readiness checks.
    pub async fn status(&self) -> Result<StatusResponse, LedgerError> {
        let (i, endpoint, mut client) = self.grpc();
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        client.status(req).await.map(|r| r.into_inner()).map_err(|s| {
            self.rotate(i);
            LedgerError::Unavailable(format!("{endpoint}: {}", s.message()))
        })
    }
}
