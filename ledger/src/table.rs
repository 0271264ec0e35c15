//! The Arrow tables the ledger serves: `events`, `sessions` and `entries`, and the
//! documented ticket that selects rows from them.
//!
//! A Flight ticket is UTF-8 JSON, for example:
//!
//! ```json
//! {"table": "events", "since": "2026-12-03T00:00:00Z", "session_id": "…", "kind": "request"}
//! ```
//!
//! Fields (all optional): `table` (`events` default, `sessions`, `entries`), `since` / `until`
//! (RFC 3339 or unix ns, on commit time, `until` exclusive), `session_id`, `identity` (matches
//! subject or email), `resource`, `kind` (`session_start`, `request`, `response`, `denied`,
//! `session_end`), `from_index`, `limit`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, FixedSizeBinaryBuilder, ListBuilder, RecordBatch, StringBuilder,
    TimestampNanosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use custody_proto::entry::entry_hash;
use custody_proto::Event;
use serde::{Deserialize, Serialize};

use crate::state::SessionSummary;
pub use custody_proto::table::{decode_event, events_schema, kind_from_name, kind_name, param_text, protocol_name, EventsBuilder};
use custody_proto::table::{list_of_strings, opt, ts};

/// Which table a ticket reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// One row per event.
    #[default]
    Events,
    /// One row per session.
    Sessions,
    /// Raw entries (index, bytes, hash), for independent verification.
    Entries,
}

/// A time bound: RFC 3339 text or unix nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TimeArg {
    /// Unix ns.
    Nanos(i64),
    /// RFC 3339.
    Text(String),
}

impl TimeArg {
    /// Unix ns.
    pub fn nanos(&self) -> Result<i64, String> {
        match self {
            TimeArg::Nanos(n) => Ok(*n),
            TimeArg::Text(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("invalid time {s:?}: {e} (expected RFC 3339, e.g. 2026-12-03T10:00:00Z)"))?
                .timestamp_nanos_opt()
                .ok_or_else(|| format!("time {s:?} is out of range")),
        }
    }
}

/// The documented ticket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketQuery {
    #[serde(default)]
    pub table: Table,
    pub since: Option<TimeArg>,
    pub until: Option<TimeArg>,
    pub session_id: Option<String>,
    pub identity: Option<String>,
    pub resource: Option<String>,
    pub kind: Option<String>,
    pub from_index: Option<u64>,
    pub limit: Option<u64>,
    /// Serve from this node's copy if it heard from the leader within this many
    /// milliseconds, instead of a linearizable read through the leader.
    pub max_staleness_ms: Option<u64>,
}

/// Largest ticket accepted.
pub const MAX_TICKET: usize = 16 * 1024;

impl TicketQuery {
    /// Parses a ticket. Empty means "all events".
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_TICKET {
            return Err(format!("ticket of {} bytes exceeds {MAX_TICKET}", bytes.len()));
        }
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Self::default());
        }
        let q: Self = serde_json::from_slice(bytes).map_err(|e| {
            format!("invalid ticket: {e}; expected JSON such as {{\"table\":\"events\",\"session_id\":\"...\"}}")
        })?;
        if let Some(k) = &q.kind {
            if kind_from_name(k).is_none() {
                return Err(format!(
                    "unknown kind {k:?}; expected session_start, request, response, denied, session_end or audit_query"
                ));
            }
        }
        q.time_range()?;
        Ok(q)
    }

    /// `[since, until)` in unix ns.
    pub fn time_range(&self) -> Result<(i64, i64), String> {
        let since = self.since.as_ref().map(|t| t.nanos()).transpose()?.unwrap_or(i64::MIN);
        let until = self.until.as_ref().map(|t| t.nanos()).transpose()?.unwrap_or(i64::MAX);
        Ok((since, until))
    }

    /// Whether a decoded event passes the non-index filters.
    pub fn matches(&self, ev: &Event) -> bool {
        if let Some(s) = &self.session_id {
            if &ev.session_id != s {
                return false;
            }
        }
        if let Some(r) = &self.resource {
            if &ev.resource != r {
                return false;
            }
        }
        if let Some(k) = &self.kind {
            if kind_from_name(k) != Some(ev.kind) {
                return false;
            }
        }
        if let Some(who) = &self.identity {
            match &ev.identity {
                Some(id) if &id.subject == who || &id.email == who => {}
                _ => return false,
            }
        }
        true
    }

    /// Whether a session passes the filters.
    pub fn matches_session(&self, s: &SessionSummary) -> bool {
        let (since, until) = self.time_range().unwrap_or((i64::MIN, i64::MAX));
        (self.session_id.as_ref().is_none_or(|x| &s.session_id == x))
            && (self.resource.as_ref().is_none_or(|x| &s.resource == x))
            && (self.identity.as_ref().is_none_or(|x| &s.subject == x || &s.email == x))
            && s.last_ns >= since
            && s.start_ns < until
    }
}

/// Schema of the `sessions` table.
pub fn sessions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("session_id", DataType::Utf8, false),
        Field::new("start_time", ts(), false),
        Field::new("last_time", ts(), false),
        Field::new("status", DataType::Utf8, false),
        Field::new("end_reason", DataType::Utf8, true),
        Field::new("issuer", DataType::Utf8, true),
        Field::new("subject", DataType::Utf8, true),
        Field::new("email", DataType::Utf8, true),
        Field::new("agent", DataType::Utf8, true),
        Field::new("groups", list_of_strings(), true),
        Field::new("resource", DataType::Utf8, false),
        Field::new("protocol", DataType::Utf8, false),
        Field::new("proxy_id", DataType::Utf8, false),
        Field::new("client_addr", DataType::Utf8, true),
        Field::new("database", DataType::Utf8, true),
        Field::new("user", DataType::Utf8, true),
        Field::new("application_name", DataType::Utf8, true),
        Field::new("first_index", DataType::UInt64, false),
        Field::new("last_index", DataType::UInt64, false),
        Field::new("events", DataType::UInt64, false),
        Field::new("statements", DataType::UInt64, false),
        Field::new("errors", DataType::UInt64, false),
        Field::new("last_response_unrecorded", DataType::Boolean, false),
    ]))
}

/// Schema of the `entries` table.
pub fn entries_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("index", DataType::UInt64, false),
        Field::new("entry", DataType::Binary, false),
        Field::new("entry_hash", DataType::FixedSizeBinary(32), false),
    ]))
}

/// Builds one `sessions` batch.
pub fn sessions_batch(rows: &[SessionSummary]) -> RecordBatch {
    let mut id = StringBuilder::new();
    let mut start = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut last = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut status = StringBuilder::new();
    let mut end_reason = StringBuilder::new();
    let mut issuer = StringBuilder::new();
    let mut subject = StringBuilder::new();
    let mut email = StringBuilder::new();
    let mut agent = StringBuilder::new();
    let mut groups = ListBuilder::new(StringBuilder::new());
    let mut resource = StringBuilder::new();
    let mut protocol = StringBuilder::new();
    let mut proxy = StringBuilder::new();
    let mut client = StringBuilder::new();
    let mut database = StringBuilder::new();
    let mut user = StringBuilder::new();
    let mut app = StringBuilder::new();
    let mut first = UInt64Builder::new();
    let mut lasti = UInt64Builder::new();
    let mut events = UInt64Builder::new();
    let mut statements = UInt64Builder::new();
    let mut errors = UInt64Builder::new();
    let mut unrec = BooleanBuilder::new();
    for s in rows {
        id.append_value(&s.session_id);
        start.append_value(s.start_ns);
        last.append_value(s.last_ns);
        status.append_value(&s.status);
        opt(&mut end_reason, &s.end_reason);
        opt(&mut issuer, &s.issuer);
        opt(&mut subject, &s.subject);
        opt(&mut email, &s.email);
        opt(&mut agent, &s.agent);
        for g in &s.groups {
            groups.values().append_value(g);
        }
        groups.append(true);
        resource.append_value(&s.resource);
        protocol.append_value(&s.protocol);
        proxy.append_value(&s.proxy_id);
        opt(&mut client, &s.client_addr);
        opt(&mut database, &s.database);
        opt(&mut user, &s.user);
        opt(&mut app, &s.application_name);
        first.append_value(s.first_index);
        lasti.append_value(s.last_index);
        events.append_value(s.events);
        statements.append_value(s.statements);
        errors.append_value(s.errors);
        unrec.append_value(s.last_response_unrecorded);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(start.finish()),
        Arc::new(last.finish()),
        Arc::new(status.finish()),
        Arc::new(end_reason.finish()),
        Arc::new(issuer.finish()),
        Arc::new(subject.finish()),
        Arc::new(email.finish()),
        Arc::new(agent.finish()),
        Arc::new(groups.finish()),
        Arc::new(resource.finish()),
        Arc::new(protocol.finish()),
        Arc::new(proxy.finish()),
        Arc::new(client.finish()),
        Arc::new(database.finish()),
        Arc::new(user.finish()),
        Arc::new(app.finish()),
        Arc::new(first.finish()),
        Arc::new(lasti.finish()),
        Arc::new(events.finish()),
        Arc::new(statements.finish()),
        Arc::new(errors.finish()),
        Arc::new(unrec.finish()),
    ];
    RecordBatch::try_new(sessions_schema(), cols).expect("builders match sessions_schema")
}

/// Builds one `entries` batch.
pub fn entries_batch(rows: &[(u64, Vec<u8>)]) -> RecordBatch {
    let mut index = UInt64Builder::new();
    let mut entry = BinaryBuilder::new();
    let mut hash = FixedSizeBinaryBuilder::new(32);
    for (i, b) in rows {
        index.append_value(*i);
        entry.append_value(b);
        let _ = hash.append_value(entry_hash(b));
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(index.finish()),
        Arc::new(entry.finish()),
        Arc::new(hash.finish()),
    ];
    RecordBatch::try_new(entries_schema(), cols).expect("builders match entries_schema")
}
