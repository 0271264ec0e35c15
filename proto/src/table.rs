//! The `events` table: one Arrow row per ledger event, decoded from the entry's canonical
//! bytes. The ledger serves it over Flight and Flight SQL, and `custody export` writes it to
//! Parquet; an offline verifier rebuilds a row from its entry with the same code and so can
//! tell a changed column from a changed entry.
//!
//! Only with the `arrow` feature. No I/O here either.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanBuilder, FixedSizeBinaryBuilder, ListBuilder, RecordBatch, StringBuilder, TimestampNanosecondBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use prost::Message;

use crate::entry::{entry_hash, Entry, PrunedEntry};
use crate::pb::v1::{event, EventKind, Outcome, Param, PgResponse};
use crate::Event;

/// Lowercase protocol name.
pub fn protocol_name(p: i32) -> &'static str {
    match crate::pb::v1::Protocol::try_from(p) {
        Ok(crate::pb::v1::Protocol::Postgres) => "postgres",
        Ok(crate::pb::v1::Protocol::Flight) => "flight",
        _ => "unspecified",
    }
}

/// Event kind by its lowercase name.
pub fn kind_from_name(name: &str) -> Option<i32> {
    Some(match name {
        "session_start" => EventKind::SessionStart,
        "request" => EventKind::Request,
        "response" => EventKind::Response,
        "denied" => EventKind::Denied,
        "session_end" => EventKind::SessionEnd,
        "audit_query" => EventKind::AuditQuery,
        "export" => EventKind::Export,
        "legal_hold" => EventKind::LegalHold,
        "prune" => EventKind::Prune,
        _ => return None,
    } as i32)
}

/// Lowercase name of an event kind.
pub fn kind_name(kind: i32) -> &'static str {
    match EventKind::try_from(kind) {
        Ok(EventKind::SessionStart) => "session_start",
        Ok(EventKind::Request) => "request",
        Ok(EventKind::Response) => "response",
        Ok(EventKind::Denied) => "denied",
        Ok(EventKind::SessionEnd) => "session_end",
        Ok(EventKind::AuditQuery) => "audit_query",
        Ok(EventKind::Export) => "export",
        Ok(EventKind::LegalHold) => "legal_hold",
        Ok(EventKind::Prune) => "prune",
        _ => "unspecified",
    }
}

fn outcome_name(o: i32) -> &'static str {
    match Outcome::try_from(o) {
        Ok(Outcome::Ok) => "ok",
        Ok(Outcome::Error) => "error",
        Ok(Outcome::Skipped) => "skipped",
        Ok(Outcome::Suspended) => "suspended",
        Ok(Outcome::Empty) => "empty",
        Ok(Outcome::Notification) => "notification",
        Ok(Outcome::Copy) => "copy",
        _ => "unspecified",
    }
}

/// Timestamps in the tables: nanoseconds, UTC.
pub fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// A list of nullable strings.
pub fn list_of_strings() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// Schema of the `events` table.
pub fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("index", DataType::UInt64, false),
        Field::new("commit_time", ts(), false),
        Field::new("proxy_time", ts(), false),
        Field::new("session_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("issuer", DataType::Utf8, true),
        Field::new("subject", DataType::Utf8, true),
        Field::new("email", DataType::Utf8, true),
        Field::new("groups", list_of_strings(), true),
        Field::new("agent", DataType::Utf8, true),
        Field::new("client_id", DataType::Utf8, true),
        Field::new("resource", DataType::Utf8, false),
        Field::new("protocol", DataType::Utf8, false),
        Field::new("proxy_id", DataType::Utf8, false),
        Field::new("client_addr", DataType::Utf8, true),
        Field::new("message", DataType::Utf8, true),
        Field::new("sql", DataType::Utf8, true),
        Field::new("statement_name", DataType::Utf8, true),
        Field::new("portal", DataType::Utf8, true),
        Field::new("params", list_of_strings(), true),
        Field::new("in_reply_to", DataType::UInt64, true),
        Field::new("outcome", DataType::Utf8, true),
        Field::new("command_tag", DataType::Utf8, true),
        Field::new("rows", DataType::UInt64, true),
        Field::new("bytes", DataType::UInt64, true),
        Field::new("columns", list_of_strings(), true),
        Field::new("recorded_rows", DataType::Utf8, true),
        Field::new("rows_truncated", DataType::UInt64, true),
        Field::new("bytes_truncated", DataType::UInt64, true),
        Field::new("error_sqlstate", DataType::Utf8, true),
        Field::new("error_message", DataType::Utf8, true),
        Field::new("database", DataType::Utf8, true),
        Field::new("application_name", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("entry_hash", DataType::FixedSizeBinary(32), false),
        // True when retention removed the event's payload from hot storage (it is in the
        // export); only index, times, session, kind and hash are left.
        Field::new("pruned", DataType::Boolean, false),
    ]))
}

/// Appends `s`, or null when it is empty.
pub fn opt(b: &mut StringBuilder, s: &str) {
    if s.is_empty() {
        b.append_null()
    } else {
        b.append_value(s)
    }
}

/// Renders a parameter as text: the value, `\x`-hex for raw binary, NULL for null.
pub fn param_text(p: &Param) -> Option<String> {
    if p.is_null {
        return None;
    }
    let mut s = if !p.raw.is_empty() && p.text.is_empty() {
        format!("\\x{}", hex::encode(&p.raw))
    } else {
        p.text.clone()
    };
    if p.truncated_bytes > 0 {
        s.push_str(&format!("…(+{} bytes)", p.truncated_bytes));
    }
    Some(s)
}

fn rows_json(r: &PgResponse) -> Option<String> {
    if r.recorded_rows.is_empty() {
        return None;
    }
    let text_cols: Vec<bool> = r.columns.iter().map(|c| c.format == 0).collect();
    let rows: Vec<Vec<serde_json::Value>> = r
        .recorded_rows
        .iter()
        .map(|row| {
            row.cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if c.is_null {
                        serde_json::Value::Null
                    } else if text_cols.get(i).copied().unwrap_or(true) {
                        serde_json::Value::String(String::from_utf8_lossy(&c.value).into_owned())
                    } else {
                        serde_json::Value::String(format!("\\x{}", hex::encode(&c.value)))
                    }
                })
                .collect()
        })
        .collect();
    serde_json::to_string(&rows).ok()
}

/// Builds `events` record batches.
pub struct EventsBuilder {
    index: UInt64Builder,
    commit_time: TimestampNanosecondBuilder,
    proxy_time: TimestampNanosecondBuilder,
    session_id: StringBuilder,
    seq: UInt64Builder,
    kind: StringBuilder,
    issuer: StringBuilder,
    subject: StringBuilder,
    email: StringBuilder,
    groups: ListBuilder<StringBuilder>,
    agent: StringBuilder,
    client_id: StringBuilder,
    resource: StringBuilder,
    protocol: StringBuilder,
    proxy_id: StringBuilder,
    client_addr: StringBuilder,
    message: StringBuilder,
    sql: StringBuilder,
    statement_name: StringBuilder,
    portal: StringBuilder,
    params: ListBuilder<StringBuilder>,
    in_reply_to: UInt64Builder,
    outcome: StringBuilder,
    command_tag: StringBuilder,
    rows: UInt64Builder,
    bytes: UInt64Builder,
    columns: ListBuilder<StringBuilder>,
    recorded_rows: StringBuilder,
    rows_truncated: UInt64Builder,
    bytes_truncated: UInt64Builder,
    error_sqlstate: StringBuilder,
    error_message: StringBuilder,
    database: StringBuilder,
    application_name: StringBuilder,
    reason: StringBuilder,
    entry_hash: FixedSizeBinaryBuilder,
    pruned: BooleanBuilder,
    len: usize,
}

impl Default for EventsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventsBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self {
            index: UInt64Builder::new(),
            commit_time: TimestampNanosecondBuilder::new().with_timezone("UTC"),
            proxy_time: TimestampNanosecondBuilder::new().with_timezone("UTC"),
            session_id: StringBuilder::new(),
            seq: UInt64Builder::new(),
            kind: StringBuilder::new(),
            issuer: StringBuilder::new(),
            subject: StringBuilder::new(),
            email: StringBuilder::new(),
            groups: ListBuilder::new(StringBuilder::new()),
            agent: StringBuilder::new(),
            client_id: StringBuilder::new(),
            resource: StringBuilder::new(),
            protocol: StringBuilder::new(),
            proxy_id: StringBuilder::new(),
            client_addr: StringBuilder::new(),
            message: StringBuilder::new(),
            sql: StringBuilder::new(),
            statement_name: StringBuilder::new(),
            portal: StringBuilder::new(),
            params: ListBuilder::new(StringBuilder::new()),
            in_reply_to: UInt64Builder::new(),
            outcome: StringBuilder::new(),
            command_tag: StringBuilder::new(),
            rows: UInt64Builder::new(),
            bytes: UInt64Builder::new(),
            columns: ListBuilder::new(StringBuilder::new()),
            recorded_rows: StringBuilder::new(),
            rows_truncated: UInt64Builder::new(),
            bytes_truncated: UInt64Builder::new(),
            error_sqlstate: StringBuilder::new(),
            error_message: StringBuilder::new(),
            database: StringBuilder::new(),
            application_name: StringBuilder::new(),
            reason: StringBuilder::new(),
            entry_hash: FixedSizeBinaryBuilder::new(32),
            pruned: BooleanBuilder::new(),
            len: 0,
        }
    }

    /// Rows so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds one event.
    pub fn push(&mut self, entry: &Entry<'_>, entry_bytes: &[u8], ev: &Event) {
        self.push_row(entry, ev, &entry_hash(entry_bytes), false)
    }

    fn push_row(&mut self, entry: &Entry<'_>, ev: &Event, hash: &[u8; 32], pruned: bool) {
        self.len += 1;
        self.index.append_value(entry.index);
        self.commit_time.append_value(entry.commit_time_ns);
        self.proxy_time.append_value(ev.proxy_time_ns);
        self.session_id.append_value(&ev.session_id);
        self.seq.append_value(ev.seq);
        self.kind.append_value(kind_name(ev.kind));
        let id = ev.identity.clone().unwrap_or_default();
        opt(&mut self.issuer, &id.issuer);
        opt(&mut self.subject, &id.subject);
        opt(&mut self.email, &id.email);
        for g in &id.groups {
            self.groups.values().append_value(g);
        }
        self.groups.append(true);
        opt(&mut self.agent, &id.agent);
        opt(&mut self.client_id, &id.client_id);
        self.resource.append_value(&ev.resource);
        self.protocol.append_value(protocol_name(ev.protocol));
        self.proxy_id.append_value(&ev.proxy_id);
        opt(&mut self.client_addr, &ev.client_addr);

        // An audit query shows as its interface (message) and its text (sql).
        let audit = match &ev.body {
            Some(event::Body::AuditQuery(q)) => Some(crate::pb::v1::PgRequest { message: format!("flight {}", q.interface), sql: q.query.clone(), ..Default::default() }),
            Some(event::Body::ExportRecord(x)) => Some(crate::pb::v1::PgRequest {
                message: "export".into(),
                sql: format!("{}/{} (blocks {}..={}, entries {}..{}, sha256 {})", x.target, x.manifest, x.first_height, x.last_height, x.first_index, x.end_index, x.manifest_sha256),
                ..Default::default()
            }),
            Some(event::Body::LegalHold(h)) => Some(crate::pb::v1::PgRequest {
                message: if h.released { "legal hold released".into() } else { "legal hold".into() },
                sql: format!("session {}: {}", h.session_id, h.reason),
                ..Default::default()
            }),
            Some(event::Body::Prune(p)) => Some(crate::pb::v1::PgRequest {
                message: "prune".into(),
                sql: format!("payloads of entries {}..{} removed ({}; exported to {}/{})", p.from_index, p.end_index, p.policy, p.archive, p.manifest),
                ..Default::default()
            }),
            _ => None,
        };
        let req = match &ev.body {
            Some(event::Body::PgRequest(r)) => Some(r),
            _ => audit.as_ref(),
        };
        let resp = match &ev.body {
            Some(event::Body::PgResponse(r)) => Some(r),
            _ => None,
        };
        match req {
            Some(r) => {
                self.message.append_value(&r.message);
                if r.sql.is_empty() && r.message != "Query" && r.message != "Parse" {
                    self.sql.append_null();
                } else {
                    self.sql.append_value(&r.sql);
                }
                if matches!(r.message.as_str(), "Parse" | "Bind" | "Describe" | "Close" | "Execute") && (r.message != "Describe" && r.message != "Close" || r.target_kind == "S") {
                    self.statement_name.append_value(&r.statement_name);
                } else {
                    self.statement_name.append_null();
                }
                if matches!(r.message.as_str(), "Bind" | "Execute") || r.target_kind == "P" {
                    self.portal.append_value(&r.portal);
                } else {
                    self.portal.append_null();
                }
                if matches!(r.message.as_str(), "Bind" | "Execute" | "FunctionCall") {
                    for p in &r.params {
                        match param_text(p) {
                            Some(t) => self.params.values().append_value(t),
                            None => self.params.values().append_null(),
                        }
                    }
                    self.params.append(true);
                } else {
                    self.params.append(false);
                }
            }
            None => {
                self.message.append_null();
                self.sql.append_null();
                self.statement_name.append_null();
                self.portal.append_null();
                self.params.append(false);
            }
        }
        match resp {
            Some(r) => {
                self.in_reply_to.append_value(r.in_reply_to);
                self.outcome.append_value(outcome_name(r.outcome));
                opt(&mut self.command_tag, &r.command_tag);
                self.rows.append_value(r.rows);
                self.bytes.append_value(r.bytes);
                if r.columns.is_empty() {
                    self.columns.append(false);
                } else {
                    for c in &r.columns {
                        self.columns.values().append_value(&c.name);
                    }
                    self.columns.append(true);
                }
                match rows_json(r) {
                    Some(j) => self.recorded_rows.append_value(j),
                    None => self.recorded_rows.append_null(),
                }
                self.rows_truncated.append_value(r.rows_truncated);
                self.bytes_truncated.append_value(r.bytes_truncated);
                match &r.error {
                    Some(e) => {
                        self.error_sqlstate.append_value(&e.sqlstate);
                        self.error_message.append_value(&e.message);
                    }
                    None => {
                        self.error_sqlstate.append_null();
                        self.error_message.append_null();
                    }
                }
            }
            None => {
                self.in_reply_to.append_null();
                self.outcome.append_null();
                self.command_tag.append_null();
                self.rows.append_null();
                self.bytes.append_null();
                self.columns.append(false);
                self.recorded_rows.append_null();
                self.rows_truncated.append_null();
                self.bytes_truncated.append_null();
                self.error_sqlstate.append_null();
                self.error_message.append_null();
            }
        }
        match &ev.body {
            Some(event::Body::SessionStart(s)) => {
                self.database.append_value(&s.database);
                self.application_name.append_value(&s.application_name);
                self.reason.append_null();
            }
            Some(event::Body::Denied(d)) => {
                self.database.append_null();
                self.application_name.append_null();
                self.reason.append_value(format!("{}: {}", d.check, d.reason));
            }
            Some(event::Body::SessionEnd(e)) => {
                self.database.append_null();
                self.application_name.append_null();
                let mut r = e.reason.clone();
                if !e.detail.is_empty() {
                    r.push_str(": ");
                    r.push_str(&e.detail);
                }
                if e.last_response_unrecorded {
                    r.push_str(" (last response not recorded)");
                }
                self.reason.append_value(r);
            }
            _ => {
                self.database.append_null();
                self.application_name.append_null();
                self.reason.append_null();
            }
        }
        // The hash has exactly 32 bytes, which is the builder's width.
        let _ = self.entry_hash.append_value(hash);
        self.pruned.append_value(pruned);
    }

    /// Adds the row of an entry whose payload was pruned: index, commit time, session, kind
    /// and hash; the rest empty or null.
    pub fn push_pruned(&mut self, p: &PrunedEntry) {
        let ev = Event { session_id: p.session_id.clone(), kind: p.kind, ..Default::default() };
        let entry = Entry { index: p.index, commit_time_ns: p.commit_time_ns, prev_hash: p.prev_hash, event: &[] };
        self.push_row(&entry, &ev, &p.entry_hash, true);
    }

    /// Finishes a batch and resets the builder.
    pub fn finish(&mut self) -> RecordBatch {
        self.len = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.index.finish()),
            Arc::new(self.commit_time.finish()),
            Arc::new(self.proxy_time.finish()),
            Arc::new(self.session_id.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.issuer.finish()),
            Arc::new(self.subject.finish()),
            Arc::new(self.email.finish()),
            Arc::new(self.groups.finish()),
            Arc::new(self.agent.finish()),
            Arc::new(self.client_id.finish()),
            Arc::new(self.resource.finish()),
            Arc::new(self.protocol.finish()),
            Arc::new(self.proxy_id.finish()),
            Arc::new(self.client_addr.finish()),
            Arc::new(self.message.finish()),
            Arc::new(self.sql.finish()),
            Arc::new(self.statement_name.finish()),
            Arc::new(self.portal.finish()),
            Arc::new(self.params.finish()),
            Arc::new(self.in_reply_to.finish()),
            Arc::new(self.outcome.finish()),
            Arc::new(self.command_tag.finish()),
            Arc::new(self.rows.finish()),
            Arc::new(self.bytes.finish()),
            Arc::new(self.columns.finish()),
            Arc::new(self.recorded_rows.finish()),
            Arc::new(self.rows_truncated.finish()),
            Arc::new(self.bytes_truncated.finish()),
            Arc::new(self.error_sqlstate.finish()),
            Arc::new(self.error_message.finish()),
            Arc::new(self.database.finish()),
            Arc::new(self.application_name.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.entry_hash.finish()),
            Arc::new(self.pruned.finish()),
        ];
        RecordBatch::try_new(events_schema(), cols).expect("builders match events_schema")
    }
}

/// Decodes the event inside an entry.
pub fn decode_event(entry: &Entry<'_>) -> Result<Event, prost::DecodeError> {
    Event::decode(entry.event)
}

