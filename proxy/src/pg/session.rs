//! The sans-IO PostgreSQL session tracker: what the proxy must know to record a session
//! faithfully. It does no I/O and reads no clock.
//!
//! Inputs are decoded messages: [`SessionTracker::on_request`] for each frontend message the
//! proxy is about to forward, [`SessionTracker::on_response`] for each backend message. Outputs
//! are the event bodies to record: one [`PgRequest`] per frontend message, and one
//! [`PgResponse`] per result (a Query statement, an Execute, a FunctionCall, an error on any
//! message, a skipped message, a notification).
//!
//! It follows the server's own rules:
//! - requests are answered in order, so responses are matched against a queue of expectations;
//! - after an error in the extended protocol the server skips messages until Sync, and those
//!   are recorded as skipped;
//! - a statement name is bound to its SQL only after ParseComplete, a portal only after
//!   BindComplete. Requests in the same pipeline are resolved against a shadow of that state
//!   that assumes success, and the shadow is reset to what the server confirmed on error;
//! - a ReadyForQuery with status idle ends the transaction, which destroys every portal.

use std::collections::{HashMap, VecDeque};

use custody_proto::pb::v1::{Cell, Column, Outcome, Param, PgError, PgRequest, PgResponse, Row};
use custody_proto::pg::{lossy, Backend, ErrorFields, Frontend};
use thiserror::Error;

use super::params::{format_for, render};

/// The tracker and the server disagree about the conversation.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackError {
    /// A backend message arrived that no outstanding request explains.
    #[error("server sent {got} while the proxy expected {expected}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The client sent a message that is not valid after startup.
    #[error("client sent {0} after authentication")]
    ClientUnexpected(&'static str),
}

#[derive(Debug, Clone, Default)]
struct Statement {
    sql: String,
    param_types: Vec<u32>,
    columns: Vec<Column>,
}

#[derive(Debug, Clone, Default)]
struct Portal {
    statement: Vec<u8>,
    sql: String,
    params: Vec<Param>,
    result_formats: Vec<i16>,
    columns: Vec<Column>,
}

#[derive(Debug, Clone)]
enum Expect {
    Parse { name: Vec<u8> },
    Bind { name: Vec<u8> },
    Describe { kind: u8, name: Vec<u8> },
    Close { kind: u8, name: Vec<u8> },
    Execute { portal: Vec<u8> },
    Query,
    Sync,
    FunctionCall,
}

impl Expect {
    fn name(&self) -> &'static str {
        match self {
            Expect::Parse { .. } => "ParseComplete",
            Expect::Bind { .. } => "BindComplete",
            Expect::Describe { .. } => "a Describe answer",
            Expect::Close { .. } => "CloseComplete",
            Expect::Execute { .. } => "an Execute result",
            Expect::Query => "a Query result",
            Expect::Sync => "ReadyForQuery",
            Expect::FunctionCall => "FunctionCallResponse",
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    expect: Expect,
}

#[derive(Debug, Default)]
struct ResultAcc {
    columns: Vec<Column>,
    rows: u64,
    bytes: u64,
    recorded: Vec<Row>,
    recorded_bytes: usize,
    rows_truncated: u64,
    bytes_truncated: u64,
    notices: u32,
}

/// Tracks one session. See the module docs.
#[derive(Debug)]
pub struct SessionTracker {
    limit: usize,
    statements: HashMap<Vec<u8>, Statement>,
    portals: HashMap<Vec<u8>, Portal>,
    shadow_statements: HashMap<Vec<u8>, Statement>,
    shadow_portals: HashMap<Vec<u8>, Portal>,
    parsing: HashMap<Vec<u8>, Statement>,
    binding: HashMap<Vec<u8>, Portal>,
    pending: VecDeque<Pending>,
    result: Option<ResultAcc>,
    copy_in: bool,
    copy_out: bool,
    copy_request: Option<(u64, PgRequest)>,
    copy_recorded: usize,
    last_seq: u64,
    tx_status: u8,
}

fn column(f: &custody_proto::pg::FieldDescription<'_>) -> Column {
    Column {
        name: lossy(f.name),
        type_oid: f.type_oid,
        format: f.format.max(0) as u32,
    }
}

fn pg_error(f: &ErrorFields<'_>) -> PgError {
    PgError {
        severity: f.get(b'V').or_else(|| f.get(b'S')).unwrap_or_default(),
        sqlstate: f.get(b'C').unwrap_or_default(),
        message: f.get(b'M').unwrap_or_default(),
        detail: f.get(b'D').unwrap_or_default(),
        hint: f.get(b'H').unwrap_or_default(),
    }
}

fn response(seq: u64, outcome: Outcome) -> PgResponse {
    PgResponse {
        in_reply_to: seq,
        outcome: outcome as i32,
        ..Default::default()
    }
}

fn kind_str(kind: u8) -> String {
    (kind as char).to_string()
}

impl SessionTracker {
    /// A tracker keeping at most `limit` bytes of rows per result and per value.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            statements: HashMap::new(),
            portals: HashMap::new(),
            shadow_statements: HashMap::new(),
            shadow_portals: HashMap::new(),
            parsing: HashMap::new(),
            binding: HashMap::new(),
            pending: VecDeque::new(),
            result: None,
            copy_in: false,
            copy_out: false,
            copy_request: None,
            copy_recorded: 0,
            last_seq: 0,
            tx_status: b'I',
        }
    }

    /// True while the server owes an answer to something already forwarded.
    pub fn awaiting_response(&self) -> bool {
        !self.pending.is_empty()
    }

    /// True while the server is receiving COPY data from the client.
    pub fn in_copy_in(&self) -> bool {
        self.copy_in
    }

    /// The last transaction status reported by ReadyForQuery.
    pub fn tx_status(&self) -> u8 {
        self.tx_status
    }

    /// Statements the server has confirmed (for tests and diagnostics).
    pub fn prepared_sql(&self, name: &[u8]) -> Option<&str> {
        self.statements.get(name).map(|s| s.sql.as_str())
    }

    fn push(&mut self, seq: u64, expect: Expect) {
        self.pending.push_back(Pending { seq, expect });
    }

    /// Records a frontend message about to be forwarded. Returns the request bodies to
    /// record, in order, each with the seq taken from `alloc`. Consecutive CopyData messages
    /// are folded into one body, emitted when a different message arrives or on
    /// [`SessionTracker::flush_copy`].
    pub fn on_request(
        &mut self,
        msg: &Frontend<'_>,
        alloc: &mut dyn FnMut() -> u64,
    ) -> Result<Vec<(u64, PgRequest)>, TrackError> {
        let mut out = Vec::with_capacity(1);
        if !matches!(msg, Frontend::CopyData(_)) {
            if let Some(c) = self.copy_request.take() {
                out.push(c);
            }
        }
        let limit = self.limit;
        let body = match msg {
            Frontend::Query { sql } => {
                let seq = alloc();
                // A simple Query destroys the unnamed statement and portal.
                self.shadow_statements.remove(&b""[..]);
                self.shadow_portals.remove(&b""[..]);
                self.push(seq, Expect::Query);
                Some((
                    seq,
                    PgRequest {
                        message: "Query".into(),
                        sql: lossy(sql),
                        ..Default::default()
                    },
                ))
            }
            Frontend::Parse {
                name,
                sql,
                param_types,
            } => {
                let seq = alloc();
                let st = Statement {
                    sql: lossy(sql),
                    param_types: param_types.clone(),
                    columns: Vec::new(),
                };
                self.shadow_statements.insert(name.to_vec(), st.clone());
                self.parsing.insert(name.to_vec(), st);
                self.push(seq, Expect::Parse { name: name.to_vec() });
                Some((
                    seq,
                    PgRequest {
                        message: "Parse".into(),
                        sql: lossy(sql),
                        statement_name: lossy(name),
                        param_types: param_types.clone(),
                        ..Default::default()
                    },
                ))
            }
            Frontend::Bind {
                portal,
                statement,
                formats,
                params,
                result_formats,
            } => {
                let seq = alloc();
                let st = self.shadow_statements.get(*statement).cloned().unwrap_or_default();
                let rendered: Vec<Param> = params
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        render(
                            *v,
                            format_for(formats, i),
                            st.param_types.get(i).copied().unwrap_or(0),
                            limit,
                        )
                    })
                    .collect();
                let p = Portal {
                    statement: statement.to_vec(),
                    sql: st.sql.clone(),
                    params: rendered.clone(),
                    result_formats: result_formats.clone(),
                    columns: st.columns.clone(),
                };
                self.shadow_portals.insert(portal.to_vec(), p.clone());
                self.binding.insert(portal.to_vec(), p);
                self.push(seq, Expect::Bind { name: portal.to_vec() });
                Some((
                    seq,
                    PgRequest {
                        message: "Bind".into(),
                        sql: st.sql,
                        statement_name: lossy(statement),
                        portal: lossy(portal),
                        params: rendered,
                        ..Default::default()
                    },
                ))
            }
            Frontend::Execute { portal, max_rows } => {
                let seq = alloc();
                let p = self.shadow_portals.get(*portal).cloned().unwrap_or_default();
                self.push(seq, Expect::Execute { portal: portal.to_vec() });
                Some((
                    seq,
                    PgRequest {
                        message: "Execute".into(),
                        sql: p.sql,
                        statement_name: lossy(&p.statement),
                        portal: lossy(portal),
                        params: p.params,
                        max_rows: (*max_rows).max(0) as u32,
                        ..Default::default()
                    },
                ))
            }
            Frontend::Describe { kind, name } => {
                let seq = alloc();
                self.push(
                    seq,
                    Expect::Describe {
                        kind: *kind,
                        name: name.to_vec(),
                    },
                );
                let (statement_name, portal) = if *kind == b'S' {
                    (lossy(name), String::new())
                } else {
                    (String::new(), lossy(name))
                };
                Some((
                    seq,
                    PgRequest {
                        message: "Describe".into(),
                        target_kind: kind_str(*kind),
                        statement_name,
                        portal,
                        ..Default::default()
                    },
                ))
            }
            Frontend::Close { kind, name } => {
                let seq = alloc();
                if *kind == b'S' {
                    self.shadow_statements.remove(*name);
                } else {
                    self.shadow_portals.remove(*name);
                }
                self.push(
                    seq,
                    Expect::Close {
                        kind: *kind,
                        name: name.to_vec(),
                    },
                );
                let (statement_name, portal) = if *kind == b'S' {
                    (lossy(name), String::new())
                } else {
                    (String::new(), lossy(name))
                };
                Some((
                    seq,
                    PgRequest {
                        message: "Close".into(),
                        target_kind: kind_str(*kind),
                        statement_name,
                        portal,
                        ..Default::default()
                    },
                ))
            }
            Frontend::Sync => {
                let seq = alloc();
                // During COPY IN through the extended protocol the server ignores Sync.
                if !self.copy_in {
                    self.push(seq, Expect::Sync);
                }
                Some((
                    seq,
                    PgRequest {
                        message: "Sync".into(),
                        ..Default::default()
                    },
                ))
            }
            Frontend::Flush => Some((
                alloc(),
                PgRequest {
                    message: "Flush".into(),
                    ..Default::default()
                },
            )),
            Frontend::CopyData(data) => {
                let keep = limit.saturating_sub(self.copy_recorded).min(data.len());
                self.copy_recorded += keep;
                match &mut self.copy_request {
                    Some((_, r)) => {
                        r.payload.extend_from_slice(&data[..keep]);
                        r.payload_bytes += data.len() as u64;
                        r.truncated_bytes += (data.len() - keep) as u64;
                        r.messages += 1;
                    }
                    None => {
                        let seq = alloc();
                        self.copy_request = Some((
                            seq,
                            PgRequest {
                                message: "CopyData".into(),
                                payload: data[..keep].to_vec(),
                                payload_bytes: data.len() as u64,
                                truncated_bytes: (data.len() - keep) as u64,
                                messages: 1,
                                ..Default::default()
                            },
                        ));
                    }
                }
                None
            }
            Frontend::CopyDone => Some((
                alloc(),
                PgRequest {
                    message: "CopyDone".into(),
                    ..Default::default()
                },
            )),
            Frontend::CopyFail { message } => Some((
                alloc(),
                PgRequest {
                    message: "CopyFail".into(),
                    payload: message.to_vec(),
                    payload_bytes: message.len() as u64,
                    ..Default::default()
                },
            )),
            Frontend::FunctionCall {
                oid,
                formats,
                args,
                ..
            } => {
                let seq = alloc();
                self.push(seq, Expect::FunctionCall);
                Some((
                    seq,
                    PgRequest {
                        message: "FunctionCall".into(),
                        function_oid: *oid,
                        params: args
                            .iter()
                            .enumerate()
                            .map(|(i, v)| render(*v, format_for(formats, i), 0, limit))
                            .collect(),
                        ..Default::default()
                    },
                ))
            }
            Frontend::Terminate => None,
            Frontend::Password(_) => return Err(TrackError::ClientUnexpected("a password message")),
        };
        if let Some((seq, b)) = body {
            self.last_seq = seq;
            out.push((seq, b));
        }
        Ok(out)
    }

    /// Emits a folded CopyData body, if one is open.
    pub fn flush_copy(&mut self) -> Option<(u64, PgRequest)> {
        self.copy_request.take()
    }

    fn result(&mut self) -> &mut ResultAcc {
        self.result.get_or_insert_with(ResultAcc::default)
    }

    fn finish_result(&mut self, seq: u64, outcome: Outcome, tag: &[u8]) -> PgResponse {
        let acc = self.result.take().unwrap_or_default();
        PgResponse {
            in_reply_to: seq,
            outcome: outcome as i32,
            command_tag: lossy(tag),
            rows: acc.rows,
            bytes: acc.bytes,
            columns: acc.columns,
            recorded_rows: acc.recorded,
            rows_truncated: acc.rows_truncated,
            bytes_truncated: acc.bytes_truncated,
            notices: acc.notices,
            ..Default::default()
        }
    }

    fn record_row(&mut self, cells: Vec<Option<&[u8]>>, size: usize) {
        let limit = self.limit;
        let acc = self.result();
        acc.rows += 1;
        acc.bytes += size as u64;
        if acc.recorded_bytes + size <= limit {
            acc.recorded_bytes += size;
            acc.recorded.push(Row {
                cells: cells
                    .into_iter()
                    .map(|c| match c {
                        None => Cell {
                            is_null: true,
                            value: Vec::new(),
                        },
                        Some(v) => Cell {
                            is_null: false,
                            value: v.to_vec(),
                        },
                    })
                    .collect(),
            });
        } else {
            acc.rows_truncated += 1;
            acc.bytes_truncated += size as u64;
        }
    }

    fn head(&self) -> Option<&Pending> {
        self.pending.front()
    }

    fn unexpected(&self, got: &'static str) -> TrackError {
        TrackError::Unexpected {
            expected: self.head().map(|p| p.expect.name()).unwrap_or("nothing"),
            got,
        }
    }

    /// Pops the head if it is the expectation `pred` accepts.
    fn pop_if(&mut self, got: &'static str, pred: impl Fn(&Expect) -> bool) -> Result<Pending, TrackError> {
        match self.pending.front() {
            Some(p) if pred(&p.expect) => Ok(self.pending.pop_front().expect("front exists")),
            _ => Err(self.unexpected(got)),
        }
    }

    /// Checks that a DataRow may arrive now and opens the result it belongs to.
    fn begin_data_row(&mut self) -> Result<(), TrackError> {
        match self.head().map(|p| p.expect.clone()) {
            Some(Expect::Execute { portal }) if self.result.is_none() => {
                let cols = self
                    .portals
                    .get(&portal)
                    .or_else(|| self.shadow_portals.get(&portal))
                    .map(|p| p.columns.clone())
                    .unwrap_or_default();
                self.result = Some(ResultAcc {
                    columns: cols,
                    ..Default::default()
                });
                Ok(())
            }
            Some(Expect::Execute { .. } | Expect::Query) => Ok(()),
            _ => Err(self.unexpected("DataRow")),
        }
    }

    /// Records a DataRow (`tag` `D`) or CopyData (`d`) of `frame_len` bytes that the proxy
    /// streams to the client without holding it, because it is larger than the record limit.
    /// It is counted and recorded as truncated, exactly as [`SessionTracker::on_response`]
    /// treats a row over the limit.
    pub fn on_streamed_response(&mut self, tag: u8, frame_len: usize) -> Result<(), TrackError> {
        match tag {
            b'D' => self.begin_data_row()?,
            b'd' if self.copy_out => {}
            b'd' => return Err(self.unexpected("CopyData")),
            _ => return Err(self.unexpected("a streamed message other than DataRow or CopyData")),
        }
        let acc = self.result();
        acc.rows += 1;
        acc.bytes += frame_len as u64;
        acc.rows_truncated += 1;
        acc.bytes_truncated += frame_len as u64;
        Ok(())
    }

    /// Records a backend message that is being relayed to the client. Returns the response
    /// bodies completed by it.
    pub fn on_response(&mut self, msg: &Backend<'_>, frame_len: usize) -> Result<Vec<PgResponse>, TrackError> {
        let mut out = Vec::new();
        match msg {
            Backend::ParseComplete => {
                let p = self.pop_if("ParseComplete", |e| matches!(e, Expect::Parse { .. }))?;
                if let Expect::Parse { name } = p.expect {
                    if let Some(st) = self.parsing.remove(&name) {
                        self.statements.insert(name, st);
                    }
                }
            }
            Backend::BindComplete => {
                let p = self.pop_if("BindComplete", |e| matches!(e, Expect::Bind { .. }))?;
                if let Expect::Bind { name } = p.expect {
                    if let Some(portal) = self.binding.remove(&name) {
                        self.portals.insert(name, portal);
                    }
                }
            }
            Backend::CloseComplete => {
                let p = self.pop_if("CloseComplete", |e| matches!(e, Expect::Close { .. }))?;
                if let Expect::Close { kind, name } = p.expect {
                    if kind == b'S' {
                        self.statements.remove(&name);
                    } else {
                        self.portals.remove(&name);
                    }
                }
            }
            Backend::ParameterDescription { types } => match self.head().map(|p| p.expect.clone()) {
                // The server's parameter types let later Binds decode binary values even
                // when the client's Parse left the types to the server (oid 0).
                Some(Expect::Describe { kind: b'S', name }) => {
                    for m in [&mut self.shadow_statements, &mut self.statements] {
                        if let Some(s) = m.get_mut(&name) {
                            s.param_types = types.clone();
                        }
                    }
                }
                _ => return Err(self.unexpected("ParameterDescription")),
            },
            Backend::NoData => {
                self.pop_if("NoData", |e| matches!(e, Expect::Describe { .. }))?;
            }
            Backend::RowDescription { fields } => {
                let cols: Vec<Column> = fields.iter().map(column).collect();
                match self.head().map(|p| p.expect.clone()) {
                    Some(Expect::Describe { kind, name }) => {
                        self.pending.pop_front();
                        if kind == b'S' {
                            for m in [&mut self.shadow_statements, &mut self.statements] {
                                if let Some(s) = m.get_mut(&name) {
                                    s.columns = cols.clone();
                                }
                            }
                        } else {
                            for m in [&mut self.shadow_portals, &mut self.portals] {
                                if let Some(p) = m.get_mut(&name) {
                                    let mut c = cols.clone();
                                    for (i, col) in c.iter_mut().enumerate() {
                                        col.format = format_for(&p.result_formats, i).max(0) as u32;
                                    }
                                    p.columns = c;
                                }
                            }
                        }
                    }
                    Some(Expect::Query) => {
                        self.result = Some(ResultAcc {
                            columns: cols,
                            ..Default::default()
                        });
                    }
                    _ => return Err(self.unexpected("RowDescription")),
                }
            }
            Backend::DataRow(row) => {
                self.begin_data_row()?;
                self.record_row(row.cells().collect(), frame_len);
            }
            Backend::CopyInResponse => {
                match self.head() {
                    Some(Pending {
                        expect: Expect::Query | Expect::Execute { .. },
                        ..
                    }) => {}
                    _ => return Err(self.unexpected("CopyInResponse")),
                }
                self.copy_in = true;
                self.copy_recorded = 0;
            }
            Backend::CopyOutResponse => {
                match self.head() {
                    Some(Pending {
                        expect: Expect::Query | Expect::Execute { .. },
                        ..
                    }) => {}
                    _ => return Err(self.unexpected("CopyOutResponse")),
                }
                self.copy_out = true;
                self.result = Some(ResultAcc::default());
            }
            Backend::CopyBothResponse => return Err(self.unexpected("CopyBothResponse (replication is not supported)")),
            Backend::CopyData(data) => {
                if !self.copy_out {
                    return Err(self.unexpected("CopyData"));
                }
                self.record_row(vec![Some(data)], frame_len);
            }
            Backend::CopyDone => {
                if !self.copy_out {
                    return Err(self.unexpected("CopyDone"));
                }
                self.copy_out = false;
            }
            Backend::CommandComplete { tag } => {
                self.copy_in = false;
                self.copy_out = false;
                let Some(head) = self.head().cloned() else {
                    return Err(self.unexpected("CommandComplete"));
                };
                match head.expect {
                    Expect::Execute { .. } => {
                        self.pending.pop_front();
                        out.push(self.finish_result(head.seq, Outcome::Ok, tag));
                    }
                    Expect::Query => out.push(self.finish_result(head.seq, Outcome::Ok, tag)),
                    _ => return Err(self.unexpected("CommandComplete")),
                }
            }
            Backend::EmptyQueryResponse => {
                let Some(head) = self.head().cloned() else {
                    return Err(self.unexpected("EmptyQueryResponse"));
                };
                match head.expect {
                    Expect::Execute { .. } => {
                        self.pending.pop_front();
                        out.push(self.finish_result(head.seq, Outcome::Empty, b""));
                    }
                    Expect::Query => out.push(self.finish_result(head.seq, Outcome::Empty, b"")),
                    _ => return Err(self.unexpected("EmptyQueryResponse")),
                }
            }
            Backend::PortalSuspended => {
                let p = self.pop_if("PortalSuspended", |e| matches!(e, Expect::Execute { .. }))?;
                out.push(self.finish_result(p.seq, Outcome::Suspended, b""));
            }
            Backend::FunctionCallResponse(v) => {
                let p = self.pop_if("FunctionCallResponse", |e| matches!(e, Expect::FunctionCall))?;
                let mut r = response(p.seq, Outcome::Ok);
                r.bytes = v.map(|b| b.len() as u64).unwrap_or(0);
                out.push(r);
            }
            Backend::ErrorResponse(fields) => {
                self.copy_in = false;
                self.copy_out = false;
                let err = pg_error(fields);
                let head = self.head().cloned();
                let seq = head.as_ref().map(|p| p.seq).unwrap_or(self.last_seq);
                let mut r = self.finish_result(seq, Outcome::Error, b"");
                r.error = Some(err);
                out.push(r);
                match head.map(|h| h.expect) {
                    // In a simple Query the error ends the statement; ReadyForQuery follows.
                    Some(Expect::Query) | Some(Expect::Sync) | None => {}
                    Some(_) => {
                        // Extended protocol: the failing message and everything up to Sync is
                        // discarded by the server.
                        self.pending.pop_front();
                        while let Some(p) = self.pending.front() {
                            if matches!(p.expect, Expect::Sync | Expect::Query) {
                                break;
                            }
                            let p = self.pending.pop_front().expect("front exists");
                            if matches!(p.expect, Expect::Execute { .. } | Expect::FunctionCall) {
                                out.push(response(p.seq, Outcome::Skipped));
                            }
                        }
                        self.parsing.clear();
                        self.binding.clear();
                        self.shadow_statements = self.statements.clone();
                        self.shadow_portals = self.portals.clone();
                    }
                }
            }
            Backend::NoticeResponse(_) => {
                if let Some(r) = self.result.as_mut() {
                    r.notices += 1;
                }
            }
            Backend::NotificationResponse { pid, channel, payload } => {
                out.push(PgResponse {
                    in_reply_to: self.last_seq,
                    outcome: Outcome::Notification as i32,
                    channel: lossy(channel),
                    notification: lossy(payload),
                    sender_pid: (*pid).max(0) as u32,
                    ..Default::default()
                });
            }
            Backend::ReadyForQuery { status } => {
                self.pop_if("ReadyForQuery", |e| matches!(e, Expect::Sync | Expect::Query))?;
                self.result = None;
                self.copy_in = false;
                self.copy_out = false;
                self.tx_status = *status;
                if *status == b'I' {
                    // Transaction end destroys every portal.
                    self.portals.clear();
                    self.shadow_portals.clear();
                }
                self.shadow_statements = self.statements.clone();
                self.parsing.clear();
                self.binding.clear();
            }
            Backend::ParameterStatus { .. } | Backend::BackendKeyData { .. } | Backend::NegotiateProtocolVersion => {}
            Backend::Authentication { .. } => return Err(self.unexpected("Authentication")),
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_proto::pg::{decode_frame, Frame, Side};
    use bytes::BytesMut;

    struct T {
        t: SessionTracker,
        seq: u64,
    }

    fn fe(tag: u8, body: &[u8]) -> Frame {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        decode_frame(&mut BytesMut::from(&v[..]), Side::Frontend, 1 << 20).unwrap().unwrap()
    }

    fn be(tag: u8, body: &[u8]) -> Frame {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        decode_frame(&mut BytesMut::from(&v[..]), Side::Backend, 1 << 20).unwrap().unwrap()
    }

    impl T {
        fn new() -> Self {
            Self {
                t: SessionTracker::new(1024),
                seq: 0,
            }
        }
        fn req(&mut self, f: Frame) -> Vec<(u64, PgRequest)> {
            let mut seq = self.seq;
            let out = self
                .t
                .on_request(&Frontend::parse(&f).unwrap(), &mut || {
                    seq += 1;
                    seq
                })
                .unwrap();
            self.seq = seq;
            out
        }
        fn resp(&mut self, f: Frame) -> Vec<PgResponse> {
            let len = f.raw.len();
            self.t.on_response(&Backend::parse(&f).unwrap(), len).unwrap()
        }
    }

    fn parse(name: &str, sql: &str) -> Frame {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        fe(b'P', &b)
    }

    fn bind(portal: &str, stmt: &str, params: &[&str]) -> Frame {
        let mut b = Vec::new();
        b.extend_from_slice(portal.as_bytes());
        b.push(0);
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&[0, 0]);
        fe(b'B', &b)
    }

    fn execute(portal: &str) -> Frame {
        let mut b = portal.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(&[0, 0, 0, 0]);
        fe(b'E', &b)
    }

    fn data_row(v: &str) -> Frame {
        let mut b = vec![0, 1];
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
        be(b'D', &b)
    }

    fn error(code: &str) -> Frame {
        let mut b = vec![b'S'];
        b.extend_from_slice(b"ERROR\0C");
        b.extend_from_slice(code.as_bytes());
        b.extend_from_slice(b"\0Mboom\0\0");
        be(b'E', &b)
    }

    #[test]
    fn pipelined_extended_protocol_resolves_execute_to_sql_and_params() {
        let mut t = T::new();
        t.req(parse("s1", "select $1"));
        t.req(bind("", "s1", &["42"]));
        let ex = t.req(execute(""));
        t.req(fe(b'S', b""));
        assert_eq!(ex[0].1.sql, "select $1");
        assert_eq!(ex[0].1.params[0].text, "42");
        assert!(t.resp(be(b'1', b"")).is_empty());
        assert!(t.resp(be(b'2', b"")).is_empty());
        t.resp(data_row("42"));
        let r = t.resp(be(b'C', b"SELECT 1\0"));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].in_reply_to, ex[0].0);
        assert_eq!(r[0].rows, 1);
        assert_eq!(r[0].recorded_rows[0].cells[0].value, b"42");
        t.resp(be(b'Z', b"I"));
        assert!(!t.t.awaiting_response());
        assert_eq!(t.t.prepared_sql(b"s1"), Some("select $1"));
    }

    #[test]
    fn error_mid_pipeline_skips_until_sync_and_binds_nothing() {
        let mut t = T::new();
        t.req(parse("bad", "selec 1"));
        t.req(bind("", "bad", &[]));
        let ex = t.req(execute(""));
        t.req(fe(b'S', b""));
        let r = t.resp(error("42601"));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].error.as_ref().unwrap().sqlstate, "42601");
        assert_eq!(r[1].in_reply_to, ex[0].0);
        assert_eq!(r[1].outcome, Outcome::Skipped as i32);
        t.resp(be(b'Z', b"I"));
        assert_eq!(t.t.prepared_sql(b"bad"), None, "statement is bound only after ParseComplete");
        // A later Bind to that name resolves to nothing, as the server will refuse it.
        t.req(bind("", "bad", &[]));
        let ex = t.req(execute(""));
        assert_eq!(ex[0].1.sql, "");
    }

    #[test]
    fn simple_query_with_two_statements_and_row_limit() {
        let mut t = T::new();
        t.t = SessionTracker::new(8);
        let q = t.req(fe(b'Q', b"select 1; select 2\0"));
        t.resp(be(b'T', &[0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 0xff, 0xff, 0xff, 0xff, 0, 0]));
        t.resp(data_row("1"));
        t.resp(data_row("2"));
        let r1 = t.resp(be(b'C', b"SELECT 2\0"));
        t.resp(error("22012"));
        t.resp(be(b'Z', b"I"));
        assert_eq!(r1[0].in_reply_to, q[0].0);
        assert_eq!(r1[0].rows, 2);
        assert_eq!(r1[0].recorded_rows.len(), 0, "each row frame is 11 bytes, over the 8-byte limit");
        assert_eq!(r1[0].rows_truncated, 2);
        assert_eq!(r1[0].columns[0].name, "a");
    }

    #[test]
    fn unexpected_backend_message_is_an_error_not_a_panic() {
        let mut t = T::new();
        let f = be(b'1', b"");
        assert!(t.t.on_response(&Backend::parse(&f).unwrap(), 5).is_err());
        let f = be(b'Z', b"I");
        assert!(t.t.on_response(&Backend::parse(&f).unwrap(), 6).is_err());
    }

    #[test]
    fn copy_data_is_folded_and_limited() {
        let mut t = T::new();
        t.t = SessionTracker::new(5);
        t.req(fe(b'Q', b"copy t from stdin\0"));
        t.resp(be(b'G', &[0, 0, 0]));
        assert!(t.req(fe(b'd', b"abc\n")).is_empty());
        assert!(t.req(fe(b'd', b"defg\n")).is_empty());
        let out = t.req(fe(b'c', b""));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.message, "CopyData");
        assert_eq!(out[0].1.payload, b"abc\nd");
        assert_eq!(out[0].1.payload_bytes, 9);
        assert_eq!(out[0].1.truncated_bytes, 4);
        assert_eq!(out[0].1.messages, 2);
        assert_eq!(out[1].1.message, "CopyDone");
        let r = t.resp(be(b'C', b"COPY 2\0"));
        assert_eq!(r[0].command_tag, "COPY 2");
    }

    #[test]
    fn a_streamed_row_is_counted_as_truncated_and_checked_like_any_row() {
        let mut t = T::new();
        // Not expected: no request is outstanding.
        assert!(t.t.on_streamed_response(b'D', 10 << 20).is_err());
        t.req(fe(b'Q', b"select big\0"));
        t.resp(be(b'T', &[0, 0]));
        t.t.on_streamed_response(b'D', 10 << 20).unwrap();
        // CopyData outside COPY OUT is refused.
        assert!(t.t.on_streamed_response(b'd', 10 << 20).is_err());
        let r = t.resp(be(b'C', b"SELECT 1\0"));
        t.resp(be(b'Z', b"I"));
        assert_eq!(r[0].rows, 1);
        assert_eq!(r[0].rows_truncated, 1);
        assert_eq!(r[0].bytes_truncated, 10 << 20);
        assert!(r[0].recorded_rows.is_empty());
    }
}
