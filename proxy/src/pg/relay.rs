//! The I/O loop of one PostgreSQL session: caller stream <-> proxy <-> target.
//!
//! Ordering rules (see `shared/design-notes.md`, "fail closed"):
//! - The caller's messages are read as a *flight*: every complete message available. A flight
//!   is recorded (its request events committed) before any byte of it reaches the target.
//! - A flight waits until every earlier event of the session is committed and the target has
//!   answered everything sent before (except COPY data, which the server is waiting for).
//!   So a response is always durable before the next request runs.
//! - Responses are relayed to the caller at once; their events commit while the caller reads.
//! - If the ledger misses its deadline, the flight is refused: the caller gets an
//!   ErrorResponse (SQLSTATE CU001) exactly as if the server had failed the statement, with
//!   the usual skip-until-Sync behaviour, and nothing reaches the target.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use custody_proto::pb::v1::event::Body;
use custody_proto::pb::v1::{Denied, PgRequest, PgResponse, SessionEnd, SessionStart};
use custody_proto::pg::{self, decode_frame, decode_startup, Backend, Frame, Frontend, Side, Startup};
use custody_proto::EventKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::session::SessionTracker;
use super::target::{self, TargetConn, TargetError};
use crate::cancel::CancelRegistry;
use crate::config::ResourceConfig;
use crate::ledger_client::LedgerError;
use crate::metrics::ProxyMetrics;
use crate::recorder::SessionRecorder;

/// SQLSTATE custody uses when it refuses a statement because the ledger is unavailable.
pub const SQLSTATE_LEDGER_UNAVAILABLE: &str = "CU001";
/// SQLSTATE for policy refusals.
pub const SQLSTATE_DENIED: &str = "28000";

/// Most events a session may have waiting for the ledger before it stops reading the target.
const MAX_QUEUED_EVENTS: usize = 4096;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 64 * 1024;
/// Server messages above this size (or the record limit, if larger) are streamed through.
const STREAM_THRESHOLD: usize = 1 << 20;
/// A client pipeline without a Sync is forwarded in parts once it holds this many bytes.
const FLIGHT_HOLD_BYTES: usize = 1 << 20;
/// After a failed append, how long a session at rest waits before retrying its events.
const LEDGER_RETRY_BACKOFF: Duration = Duration::from_millis(250);

/// Everything a session needs from the proxy.
pub struct SessionContext {
    /// The resource being reached.
    pub resource: ResourceConfig,
    /// The recorder, already carrying the caller's identity.
    pub recorder: SessionRecorder,
    /// Bytes of rows/values kept per result.
    pub record_limit: usize,
    /// Largest message accepted.
    pub max_message: usize,
    /// How long response events of a session at rest are held so that they share a commit
    /// with the next request (zero: append them at once).
    pub response_hold: Duration,
    /// Cancel keys of live sessions.
    pub cancels: CancelRegistry,
    /// Metrics.
    pub metrics: Arc<ProxyMetrics>,
    /// Flips to true when the proxy shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// How the session ended, for the SessionEnd event and logs.
#[derive(Debug, Clone)]
pub struct Ending {
    /// Reason code.
    pub reason: &'static str,
    /// Detail, safe to record.
    pub detail: String,
}

impl Ending {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

fn fatal(sqlstate: &str, message: &str, hint: Option<&str>) -> Bytes {
    pg::error_response("FATAL", sqlstate, message, hint)
}

fn ledger_refusal_message(e: &LedgerError) -> String {
    format!("custody: statement not executed: the audit ledger is unavailable ({e})")
}

const LEDGER_HINT: &str = "Nothing was sent to the database. Retry when the audit ledger is back; ask the custody operator if this persists.";

/// Reads the startup packet, answering SSL/GSS requests with `N`.
pub async fn read_startup<R, W>(rd: &mut R, wr: &mut W, buf: &mut BytesMut) -> Result<Startup, Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let fut = async {
        loop {
            match decode_startup(buf) {
                Ok(Some(Startup::SslRequest | Startup::GssEncRequest)) => {
                    // The QUIC leg is already TLS 1.3; the loopback leg stays plain.
                    wr.write_all(b"N").await.map_err(|e| Ending::new("client_eof", e.to_string()))?;
                    continue;
                }
                Ok(Some(s)) => return Ok(s),
                Ok(None) => {}
                Err(e) => {
                    let _ = wr.write_all(&fatal(e.sqlstate(), &format!("custody: invalid startup packet: {e}"), None)).await;
                    return Err(Ending::new("protocol_error", e.to_string()));
                }
            }
            let n = rd
                .read_buf(buf)
                .await
                .map_err(|e| Ending::new("client_eof", e.to_string()))?;
            if n == 0 {
                return Err(Ending::new("client_eof", "closed before startup"));
            }
        }
    };
    tokio::time::timeout(STARTUP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(Ending::new("protocol_error", "no startup packet within 30 s")))
}

/// Answers a refused stream in PostgreSQL terms: reads the startup, sends one FATAL.
pub async fn reject<R, W>(rd: &mut R, wr: &mut W, sqlstate: &str, message: &str, hint: Option<&str>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    if let Ok(Startup::Startup { .. }) = read_startup(rd, wr, &mut buf).await {
        let _ = wr.write_all(&fatal(sqlstate, message, hint)).await;
    }
    let _ = wr.shutdown().await;
}

/// Runs a session to its end. Records SessionStart, everything in between, and SessionEnd.
pub async fn run<R, W>(mut crd: R, mut cwr: W, mut ctx: SessionContext) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut cbuf = BytesMut::with_capacity(READ_CHUNK);
    let startup = match read_startup(&mut crd, &mut cwr, &mut cbuf).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let params = match startup {
        Startup::Cancel { pid, key } => return cancel(&mut ctx, pid, &key).await,
        Startup::Startup { params } => params,
        Startup::SslRequest | Startup::GssEncRequest => unreachable!("answered in read_startup"),
    };
    if params.iter().any(|(k, _)| k == "replication") {
        let msg = "custody: replication connections are not supported";
        let _ = cwr.write_all(&fatal("0A000", msg, None)).await;
        ctx.recorder.record(
            EventKind::Denied,
            Body::Denied(Denied {
                check: "protocol".into(),
                reason: msg.into(),
            }),
        );
        return finish(&mut ctx, &mut cwr, Ending::new("denied", msg)).await;
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let user = get("user");
    let database = ctx
        .resource
        .database
        .clone()
        .unwrap_or_else(|| if get("database").is_empty() { user.clone() } else { get("database") });
    let application_name = get("application_name");

    // The session start is itself a request to the target: record it before connecting.
    ctx.recorder.record(
        EventKind::SessionStart,
        Body::SessionStart(SessionStart {
            database: database.clone(),
            user: user.clone(),
            application_name: application_name.clone(),
            target: format!("{}:{}", ctx.resource.host, ctx.resource.port),
            target_user: ctx.resource.user.clone(),
            target_tls: ctx.resource.tls != crate::config::TargetTls::Disable,
        }),
    );
    ctx.recorder.start_flush();
    if let Err(e) = ctx.recorder.drain().await {
        ctx.metrics.refused_ledger.inc();
        let msg = format!("custody: session not opened: the audit ledger is unavailable ({e})");
        let _ = cwr.write_all(&fatal(SQLSTATE_LEDGER_UNAVAILABLE, &msg, Some(LEDGER_HINT))).await;
        return Ending::new("ledger_unavailable", e.to_string());
    }

    let password = match ctx.resource.password() {
        Ok(p) => p,
        Err(e) => {
            warn!(resource = %ctx.resource.name, error = %e, "cannot read the gateway credential");
            let msg = "custody: the gateway's credential for this resource cannot be read; contact the custody operator";
            let _ = cwr.write_all(&fatal("08001", msg, None)).await;
            return finish(&mut ctx, &mut cwr, Ending::new("target_error", "credential unreadable")).await;
        }
    };
    let conn = match target::connect(&ctx.resource, &password, &database, &params).await {
        Ok(c) => c,
        Err(e) => {
            drop(password);
            warn!(resource = %ctx.resource.name, error = %e, "target connection failed");
            let (msg, hint) = match &e {
                TargetError::Refused { .. } => (
                    format!("custody: {e}"),
                    Some("The gateway's own credential was refused: this is a custody configuration problem, not yours. Contact the custody operator."),
                ),
                _ => (format!("custody: {e}"), None),
            };
            let _ = cwr.write_all(&fatal(e.sqlstate(), &msg, hint)).await;
            return finish(&mut ctx, &mut cwr, Ending::new("target_error", e.to_string())).await;
        }
    };
    drop(password);
    info!(resource = %ctx.resource.name, database = %database, tls = conn.tls, "target session opened");
    relay(crd, cwr, cbuf, conn, ctx).await
}

async fn cancel(ctx: &mut SessionContext, pid: i32, key: &[u8]) -> Ending {
    let Some(target) = ctx.cancels.lookup(pid, key) else {
        debug!("cancel request for an unknown key ignored");
        return Ending::new("cancel", "unknown key");
    };
    if target.resource != ctx.resource.name {
        return Ending::new("cancel", "key belongs to another resource");
    }
    ctx.recorder.record(
        EventKind::Request,
        Body::PgRequest(PgRequest {
            message: "CancelRequest".into(),
            cancel_session_id: target.session_id.clone(),
            ..Default::default()
        }),
    );
    ctx.recorder.start_flush();
    if let Err(e) = ctx.recorder.drain().await {
        ctx.metrics.refused_ledger.inc();
        warn!(error = %e, "cancel request not forwarded: ledger unavailable");
        return Ending::new("ledger_unavailable", e.to_string());
    }
    if let Err(e) = target::send_cancel(&ctx.resource, pid, key).await {
        warn!(error = %e, "cancel request could not be delivered");
    }
    Ending::new("cancel", format!("cancelled session {}", target.session_id))
}

/// Records SessionEnd and flushes; a session that cannot flush hands its tail to a
/// background retry so it is recorded if the ledger returns.
async fn finish<W: AsyncWrite + Unpin>(ctx: &mut SessionContext, cwr: &mut W, ending: Ending) -> Ending {
    let _ = cwr.shutdown().await;
    ctx.recorder.record(
        EventKind::SessionEnd,
        Body::SessionEnd(SessionEnd {
            reason: ending.reason.into(),
            detail: ending.detail.clone(),
            last_response_unrecorded: false,
        }),
    );
    ctx.recorder.start_flush();
    let drained = ctx.recorder.drain().await;
    if let Err(LedgerError::Rejected(m)) = &drained {
        // The ledger already closed the session (or refuses its events): retrying cannot help.
        warn!(session_id = %ctx.recorder.session_id(), unrecorded = ctx.recorder.queued(), error = %m, "the ledger refused the end of this session");
        return ending;
    }
    if let Err(e) = drained {
        warn!(
            session_id = %ctx.recorder.session_id(),
            unrecorded = ctx.recorder.queued(),
            error = %e,
            "session ended with events the ledger has not acknowledged; retrying in the background"
        );
        let mut rec = ctx.recorder.split_off();
        tokio::spawn(async move {
            for _ in 0..120 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                rec.start_flush();
                if rec.drain().await.is_ok() {
                    info!(session_id = %rec.session_id(), "late events of an ended session recorded");
                    return;
                }
            }
            tracing::error!(session_id = %rec.session_id(), unrecorded = rec.queued(), "gave up recording the tail of a session");
        });
    }
    ending
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum FlightState {
    /// No flight held.
    Idle,
    /// Waiting for earlier events or responses before recording.
    Waiting,
    /// Request events are in flight to the ledger.
    Recording,
}

async fn relay<R, W>(mut crd: R, mut cwr: W, mut cbuf: BytesMut, conn: TargetConn, mut ctx: SessionContext) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let TargetConn {
        stream,
        startup_frames,
        cancel_key,
        leftover,
        ..
    } = conn;
    let (mut trd, mut twr) = tokio::io::split(stream);
    let mut tbuf = leftover;
    let session_id = ctx.recorder.session_id().to_string();

    // Authentication is done: tell the caller, then forward the server's parameters and key.
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&pg::authentication_ok());
    for f in &startup_frames {
        hello.extend_from_slice(&f.raw);
    }
    if let Err(e) = cwr.write_all(&hello).await {
        return finish(&mut ctx, &mut cwr, Ending::new("client_eof", e.to_string())).await;
    }
    let _cancel_guard = cancel_key
        .as_ref()
        .map(|(pid, key)| ctx.cancels.register(*pid, key.clone(), &ctx.resource.name, &session_id));

    let mut tracker = SessionTracker::new(ctx.record_limit);
    let mut flight: Vec<Frame> = Vec::new();
    let mut state = FlightState::Idle;
    let mut refusing_until_sync = false;
    let mut terminate = false;
    let mut saw_fatal = false;
    let mut shutdown = ctx.shutdown.clone();
    // Server messages larger than this are passed through as they arrive, never held whole;
    // they are over the record limit, so nothing of them would have been recorded anyway.
    let stream_threshold = STREAM_THRESHOLD.max(ctx.record_limit.saturating_add(5));
    // Bytes of a streamed server message still to pass through.
    let mut passthrough: usize = 0;

    // When set, queued events wait until then before an append starts, while the session is
    // at rest: either response events held briefly so that they share one commit with the
    // next request (the ledger makes them durable together, responses first, so no request
    // is forwarded before the previous response is committed), or a back-off after a
    // failed append.
    let mut hold_until: Option<tokio::time::Instant> = None;
    // Whether the last forwarded flight ended with a message the server answers at once.
    let mut forwarded_flush_point = true;
    // Whether responses to earlier flights were outstanding when the current flight was
    // recorded; a refusal then cannot be answered in order, and closes the session.
    let mut outstanding_before_flight = false;
    // Client bytes are buffered that have not been split into frames yet.
    let mut client_ready = !cbuf.is_empty();

    let ending = loop {
        // Split what the client sent into a flight. A flight ends at the first Sync, so that
        // each Sync-delimited segment is recorded after the answers to the one before: a
        // statement name is bound to its SQL only once the server confirmed the Parse.
        if client_ready && state == FlightState::Idle && !terminate {
            client_ready = false;
            let mut error = None;
            loop {
                match decode_frame(&mut cbuf, Side::Frontend, ctx.max_message) {
                    Ok(Some(f)) => {
                        if let Err(e) = Frontend::parse(&f) {
                            error = Some((e.sqlstate(), e.to_string()));
                            break;
                        }
                        if refusing_until_sync {
                            if f.tag() == b'S' {
                                refusing_until_sync = false;
                                let rfq = [b'Z', 0, 0, 0, 5, tracker.tx_status()];
                                if cwr.write_all(&rfq).await.is_err() {
                                    break;
                                }
                            }
                            continue;
                        }
                        let tag = f.tag();
                        flight.push(f);
                        if tag == b'X' {
                            terminate = true;
                            break;
                        }
                        if tag == b'S' {
                            // The rest stays buffered for the next flight.
                            client_ready = !cbuf.is_empty();
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error = Some((e.sqlstate(), e.to_string()));
                        break;
                    }
                }
            }
            if let Some((code, msg)) = error {
                let _ = cwr.write_all(&fatal(code, &format!("custody: invalid message from client: {msg}"), None)).await;
                break Ending::new("protocol_error", msg);
            }
            // A flight is complete at a message the server answers at once. Until then keep
            // reading: the server would hold its replies anyway, and recording the whole
            // pipeline takes one commit, not one per read. A client that sends more than
            // FLIGHT_HOLD_BYTES without a Sync gets it forwarded in parts.
            let complete = flight.last().is_some_and(|f| is_flush_point(f.tag()))
                || tracker.in_copy_in()
                || flight.iter().map(|f| f.raw.len()).sum::<usize>() >= FLIGHT_HOLD_BYTES;
            if !flight.is_empty() && complete {
                state = FlightState::Waiting;
            }
        }

        // Promote a held flight when everything before it is settled. Events still queued
        // (held responses, or ones whose append failed) go to the ledger in the same append,
        // ahead of the flight's.
        if state == FlightState::Waiting {
            // Wait for the answers to what was forwarded before, so that a refused flight can
            // be answered in order; but only if the server will answer without more input:
            // PostgreSQL holds its replies until Sync or Flush.
            let answered = !tracker.awaiting_response() || tracker.in_copy_in() || !forwarded_flush_point;
            if !ctx.recorder.has_inflight() && answered {
                outstanding_before_flight = tracker.awaiting_response() && !tracker.in_copy_in();
                if let Err(e) = record_flight(&flight, &mut tracker, &mut ctx.recorder) {
                    let _ = cwr.write_all(&fatal("08P01", &format!("custody: {e}"), None)).await;
                    break Ending::new("protocol_error", e.to_string());
                }
                state = FlightState::Recording;
            }
        }
        // Keep appends going whenever events are queued, unless the session is at rest and
        // they are being held.
        if !ctx.recorder.has_inflight() && ctx.recorder.queued() > 0 && (state != FlightState::Idle || hold_until.is_none()) {
            ctx.recorder.start_flush();
            hold_until = None;
        }
        if state == FlightState::Recording && ctx.recorder.is_idle() {
            // Committed: forward the flight.
            forwarded_flush_point = flight.last().is_some_and(|f| is_flush_point(f.tag()));
            let mut out = BytesMut::new();
            for f in flight.drain(..) {
                out.extend_from_slice(&f.raw);
            }
            state = FlightState::Idle;
            if let Err(e) = twr.write_all(&out).await {
                let _ = cwr.write_all(&fatal("08006", "custody: lost the connection to the target", None)).await;
                break Ending::new("target_error", e.to_string());
            }
            if terminate {
                let _ = twr.shutdown().await;
                break Ending::new("terminate", "");
            }
        }

        if tbuf.capacity() - tbuf.len() < READ_CHUNK / 4 {
            tbuf.reserve(READ_CHUNK);
        }
        let read_client = state == FlightState::Idle && !terminate && !client_ready;
        let read_target = ctx.recorder.queued() < MAX_QUEUED_EVENTS;
        tokio::select! {
            r = trd.read_buf(&mut tbuf), if read_target => {
                match r {
                    Ok(0) | Err(_) => {
                        if !saw_fatal {
                            let _ = cwr.write_all(&fatal("57P01", "custody: the target closed the connection unexpectedly", None)).await;
                        }
                        let detail = match r { Err(e) => e.to_string(), _ => "EOF".into() };
                        break Ending::new("target_eof", detail);
                    }
                    Ok(_) => {}
                }
                let mut out = BytesMut::new();
                let mut failure = None;
                loop {
                    if passthrough > 0 {
                        let n = passthrough.min(tbuf.len());
                        if n == 0 {
                            break;
                        }
                        out.extend_from_slice(&tbuf.split_to(n));
                        passthrough -= n;
                        continue;
                    }
                    match pg::streamable_backend_frame(&tbuf, stream_threshold) {
                        Ok(Some((tag, total))) => {
                            if let Err(e) = tracker.on_streamed_response(tag, total) {
                                failure = Some(Ending::new("protocol_error", e.to_string()));
                                break;
                            }
                            passthrough = total;
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => { failure = Some(Ending::new("target_error", format!("target sent an invalid frame: {e}"))); break; }
                    }
                    match decode_frame(&mut tbuf, Side::Backend, ctx.max_message) {
                        Ok(Some(f)) => {
                            match Backend::parse(&f) {
                                Ok(msg) => {
                                    if let Backend::ErrorResponse(fields) = &msg {
                                        if matches!(fields.get(b'S').as_deref(), Some("FATAL" | "PANIC")) {
                                            saw_fatal = true;
                                        }
                                    }
                                    match tracker.on_response(&msg, f.raw.len()) {
                                        Ok(rs) => {
                                            for r in rs {
                                                ctx.recorder.record(EventKind::Response, Body::PgResponse(r));
                                            }
                                        }
                                        Err(e) => { failure = Some(Ending::new("protocol_error", e.to_string())); }
                                    }
                                }
                                Err(e) => { failure = Some(Ending::new("target_error", format!("target sent an invalid message: {e}"))); }
                            }
                            out.extend_from_slice(&f.raw);
                            if failure.is_some() { break; }
                        }
                        Ok(None) => break,
                        Err(e) => { failure = Some(Ending::new("target_error", format!("target sent an invalid frame: {e}"))); break; }
                    }
                }
                if state == FlightState::Idle && !tracker.awaiting_response() && ctx.recorder.queued() > 0 && ctx.response_hold > Duration::ZERO {
                    // Every request is answered: hold the response events for the next request.
                    hold_until.get_or_insert_with(|| tokio::time::Instant::now() + ctx.response_hold);
                }
                if !out.is_empty() {
                    if let Err(e) = cwr.write_all(&out).await {
                        break Ending::new("client_eof", e.to_string());
                    }
                }
                if let Some(f) = failure {
                    warn!(session_id = %session_id, reason = %f.detail, "closing session");
                    let _ = cwr.write_all(&fatal("08P01", &format!("custody: {}", f.detail), None)).await;
                    break f;
                }
            }
            r = crd.read_buf(&mut cbuf), if read_client => {
                match r {
                    Ok(0) => break Ending::new("client_eof", ""),
                    Err(e) => break Ending::new("client_eof", e.to_string()),
                    Ok(_) => client_ready = true,
                }
            }
            _ = tokio::time::sleep_until(hold_until.unwrap_or_else(tokio::time::Instant::now)), if hold_until.is_some() && !ctx.recorder.has_inflight() => {
                hold_until = None;
            }
            r = ctx.recorder.wait(), if ctx.recorder.has_inflight() => {
                if let Err(LedgerError::Rejected(m)) = &r {
                    // Not a passing outage: the ledger will never take these events (it closed
                    // this session after the proxy's lease lapsed, or they conflict). Nothing
                    // more of the session may run unrecorded, so it ends here.
                    ctx.metrics.refused_ledger.inc();
                    warn!(session_id = %session_id, error = %m, "the ledger refused this session's events; closing it");
                    let msg = format!("custody: session closed: the audit ledger refused its events ({m})");
                    let _ = cwr.write_all(&fatal(SQLSTATE_LEDGER_UNAVAILABLE, &msg, Some("Reconnect to start a new session."))).await;
                    break Ending::new("ledger_refused", m.clone());
                }
                if let Err(e) = r {
                    hold_until = Some(tokio::time::Instant::now() + LEDGER_RETRY_BACKOFF);
                    ctx.metrics.ledger_failures.inc();
                    warn!(session_id = %session_id, error = %e, queued = ctx.recorder.queued(), "ledger append failed");
                    // Only the append that carried the flight's own events can refuse it. A
                    // flight still waiting (behind a retry of earlier events that failed) is
                    // recorded next and gets its own full deadline.
                    if state == FlightState::Recording && outstanding_before_flight {
                        // Earlier replies are still to come; an emulated refusal would overtake them.
                        ctx.metrics.refused_ledger.inc();
                        let _ = cwr.write_all(&fatal(SQLSTATE_LEDGER_UNAVAILABLE, &ledger_refusal_message(&e), Some(LEDGER_HINT))).await;
                        break Ending::new("ledger_unavailable", e.to_string());
                    }
                    if state == FlightState::Recording {
                        ctx.metrics.refused_ledger.inc();
                        match refuse_flight(&mut flight, &mut tracker, &mut ctx, &e, &mut twr).await {
                            Ok(Refusal { reply, until_sync }) => {
                                refusing_until_sync = until_sync;
                                state = FlightState::Idle;
                                if cwr.write_all(&reply).await.is_err() {
                                    break Ending::new("client_eof", "");
                                }
                            }
                            Err(end) => {
                                let _ = cwr.write_all(&fatal(SQLSTATE_LEDGER_UNAVAILABLE, &ledger_refusal_message(&e), Some(LEDGER_HINT))).await;
                                break end;
                            }
                        }
                    }
                }
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                let _ = cwr.write_all(&fatal("57P01", "custody: the proxy is shutting down; reconnect to another proxy", None)).await;
                break Ending::new("shutdown", "");
            }
        }
    };
    let _ = twr.shutdown().await;
    finish(&mut ctx, &mut cwr, ending).await
}

/// Turns a flight into request events (queued on the recorder) and updates the tracker.
/// Frontend messages after which PostgreSQL answers without waiting for more input.
fn is_flush_point(tag: u8) -> bool {
    matches!(tag, b'S' | b'H' | b'Q' | b'F' | b'c' | b'f' | b'X')
}

fn record_flight(
    flight: &[Frame],
    tracker: &mut SessionTracker,
    recorder: &mut SessionRecorder,
) -> Result<(), super::session::TrackError> {
    let mut bodies = Vec::new();
    for f in flight {
        // Every frame in a flight was parsed once already when it was read.
        let Ok(msg) = Frontend::parse(f) else { continue };
        bodies.extend(tracker.on_request(&msg, &mut || recorder.alloc_seq())?);
    }
    bodies.extend(tracker.flush_copy());
    for (seq, b) in bodies {
        recorder.push(seq, EventKind::Request, Body::PgRequest(b));
    }
    Ok(())
}

struct Refusal {
    reply: BytesMut,
    until_sync: bool,
}

/// Answers a refused flight as a server that failed it would, and lets the tracker see the
/// same answers so the record says what happened. Nothing of the flight reaches the target,
/// except a CopyFail that aborts an open COPY.
async fn refuse_flight<T: AsyncWrite + Unpin>(
    flight: &mut Vec<Frame>,
    tracker: &mut SessionTracker,
    ctx: &mut SessionContext,
    err: &LedgerError,
    twr: &mut T,
) -> Result<Refusal, Ending> {
    let msg = ledger_refusal_message(err);
    let frames: Vec<Frame> = std::mem::take(flight);
    if tracker.in_copy_in() {
        // The server is waiting for COPY data; abort the COPY instead of feeding it
        // unrecorded rows. Its ErrorResponse and ReadyForQuery reach the caller as usual.
        let mut fail = BytesMut::new();
        let _ = pg::write_body(&mut fail, Some(b'f'), |b| {
            b.extend_from_slice(msg.as_bytes());
            b.extend_from_slice(&[0]);
        });
        twr.write_all(&fail)
            .await
            .map_err(|e| Ending::new("target_error", e.to_string()))?;
        return Ok(Refusal {
            reply: BytesMut::new(),
            until_sync: false,
        });
    }
    let mut reply = BytesMut::new();
    let mut skipping = false;
    let mut feed = |tracker: &mut SessionTracker, ctx: &mut SessionContext, bytes: Bytes| -> Result<(), Ending> {
        let mut b = BytesMut::from(&bytes[..]);
        if let Ok(Some(f)) = decode_frame(&mut b, Side::Backend, 1 << 20) {
            if let Ok(m) = Backend::parse(&f) {
                let rs: Vec<PgResponse> = tracker
                    .on_response(&m, f.raw.len())
                    .map_err(|e| Ending::new("protocol_error", e.to_string()))?;
                for r in rs {
                    ctx.recorder.record(EventKind::Response, Body::PgResponse(r));
                }
            }
        }
        reply.extend_from_slice(&bytes);
        Ok(())
    };
    let error = pg::error_response("ERROR", SQLSTATE_LEDGER_UNAVAILABLE, &msg, Some(LEDGER_HINT));
    for f in &frames {
        match f.tag() {
            b'Q' => {
                feed(tracker, ctx, error.clone())?;
                feed(tracker, ctx, Bytes::copy_from_slice(&[b'Z', 0, 0, 0, 5, tracker.tx_status()]))?;
            }
            b'S' => {
                skipping = false;
                feed(tracker, ctx, Bytes::copy_from_slice(&[b'Z', 0, 0, 0, 5, tracker.tx_status()]))?;
            }
            b'P' | b'B' | b'E' | b'D' | b'C' | b'F' => {
                if !skipping {
                    skipping = true;
                    feed(tracker, ctx, error.clone())?;
                }
            }
            b'X' => return Err(Ending::new("ledger_unavailable", err.to_string())),
            _ => {}
        }
    }
    Ok(Refusal {
        reply,
        until_sync: skipping,
    })
}
