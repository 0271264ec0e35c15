//! [`SessionRecorder`]: turns a session's event bodies into events and appends them to the
//! ledger in seq order, one append in flight at a time.
//!
//! Events wait in a bounded queue until the ledger acknowledges them. A failed append leaves
//! them queued (its outcome is unknown, and their idempotency keys make a retry safe), so
//! they are retried with the next flush and nothing is dropped silently.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use custody_proto::pb::ledger::AppendResult;
use custody_proto::pb::v1::event::Body;
use custody_proto::{Event, EventKind};
use futures::future::BoxFuture;
use prost::Message;

use crate::ledger_client::{LedgerClient, LedgerError};

/// Most events sent in one append.
const MAX_APPEND_EVENTS: usize = 1024;

/// Appends one session's events in order.
pub struct SessionRecorder {
    client: LedgerClient,
    template: Event,
    next_seq: u64,
    queue: VecDeque<Bytes>,
    inflight: Option<(usize, BoxFuture<'static, Result<Vec<AppendResult>, LedgerError>>)>,
    /// Index of the last acknowledged event.
    pub last_index: Option<u64>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl SessionRecorder {
    /// A recorder whose events copy `template`'s identity fields (proxy, session, caller,
    /// resource, protocol, client address).
    pub fn new(client: LedgerClient, template: Event) -> Self {
        Self {
            client,
            template,
            next_seq: 0,
            queue: VecDeque::new(),
            inflight: None,
            last_index: None,
        }
    }

    /// The session id.
    pub fn session_id(&self) -> &str {
        &self.template.session_id
    }

    /// Reserves the next seq.
    pub fn alloc_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Queues an event with a seq from [`SessionRecorder::alloc_seq`].
    pub fn push(&mut self, seq: u64, kind: EventKind, body: Body) {
        let mut ev = self.template.clone();
        ev.seq = seq;
        ev.proxy_time_ns = now_ns();
        ev.kind = kind as i32;
        ev.body = Some(body);
        self.queue.push_back(ev.encode_to_vec().into());
    }

    /// Queues an event with the next seq; returns the seq.
    pub fn record(&mut self, kind: EventKind, body: Body) -> u64 {
        let seq = self.alloc_seq();
        self.push(seq, kind, body);
        seq
    }

    /// Events not yet acknowledged.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True when an append is in flight.
    pub fn has_inflight(&self) -> bool {
        self.inflight.is_some()
    }

    /// True when every queued event is acknowledged.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_none()
    }

    /// Starts an append of the queued events if none is in flight.
    pub fn start_flush(&mut self) {
        if self.inflight.is_some() || self.queue.is_empty() {
            return;
        }
        let n = self.queue.len().min(MAX_APPEND_EVENTS);
        let events: Vec<Bytes> = self.queue.iter().take(n).cloned().collect();
        let client = self.client.clone();
        self.inflight = Some((n, Box::pin(async move { client.append(events).await })));
    }

    /// Waits for the in-flight append. On success its events leave the queue. Cancel-safe:
    /// dropping this future leaves the append in flight.
    pub async fn wait(&mut self) -> Result<(), LedgerError> {
        let Some((n, fut)) = self.inflight.as_mut() else {
            return Ok(());
        };
        let n = *n;
        let r = fut.await;
        self.inflight = None;
        let results = r?;
        for _ in 0..n {
            self.queue.pop_front();
        }
        self.last_index = results.last().map(|r| r.index).or(self.last_index);
        Ok(())
    }

    /// Moves the unacknowledged tail into a new recorder (for a background retry), leaving
    /// this one empty.
    pub fn split_off(&mut self) -> SessionRecorder {
        SessionRecorder {
            client: self.client.clone(),
            template: self.template.clone(),
            next_seq: self.next_seq,
            queue: std::mem::take(&mut self.queue),
            inflight: self.inflight.take(),
            last_index: self.last_index,
        }
    }

    /// Flushes until the queue is empty or an append fails.
    pub async fn drain(&mut self) -> Result<(), LedgerError> {
        loop {
            self.wait().await?;
            if self.queue.is_empty() {
                return Ok(());
            }
            self.start_flush();
        }
    }
}
