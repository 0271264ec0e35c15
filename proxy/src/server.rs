//! The proxy: QUIC listener, per-stream preamble handling (token, resource, policy), the
//! PostgreSQL relay, and HTTP health and metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use bytes::BytesMut;
use custody_proto::pb::v1::event::Body;
use custody_proto::pb::v1::{Denied, Protocol};
use custody_proto::tunnel::{self, AcceptStatus, StreamAccept, StreamOpen};
use custody_proto::{Event, EventKind};
use tokio::io::AsyncReadExt;
use tokio::sync::{watch, Semaphore};
use tracing::{info, info_span, warn, Instrument};

use crate::auth::TokenValidator;
use crate::cancel::CancelRegistry;
use crate::config::ProxyConfig;
use crate::ledger_client::LedgerClient;
use crate::metrics::ProxyMetrics;
use crate::pg::relay::{self, SessionContext, SQLSTATE_DENIED};
use crate::policy;
use crate::recorder::SessionRecorder;

const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sessions may run on after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

struct Shared {
    cfg: ProxyConfig,
    /// This run of the proxy; the ledger closes a run's open sessions when its lease lapses.
    instance: String,
    validator: TokenValidator,
    ledger: LedgerClient,
    metrics: Arc<ProxyMetrics>,
    cancels: CancelRegistry,
    sessions: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

/// Runs the proxy until `shutdown` resolves.
pub async fn run(cfg: ProxyConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let (tls, fingerprint) = crate::tls::server_config(&cfg.tls)?;
    let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS config is not usable for QUIC")?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1024u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into()?));
    server_config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(server_config, cfg.listen)
        .with_context(|| format!("binding QUIC listener on {}", cfg.listen))?;
    let http = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", cfg.http_listen))?;
    info!(
        quic = %endpoint.local_addr()?,
        http = %http.local_addr()?,
        %fingerprint,
        "proxy listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let metrics = Arc::new(ProxyMetrics::new());
    let ledger = LedgerClient::new(&cfg.ledger, Duration::from_millis(cfg.append_timeout_ms))?;
    let instance = uuid::Uuid::now_v7().to_string();
    tokio::spawn(keep_lease(ledger.clone(), cfg.proxy_id.clone(), instance.clone(), Duration::from_millis(cfg.lease_ttl_ms), stop_rx.clone()));
    let shared = Arc::new(Shared {
        instance,
        validator: TokenValidator::new(cfg.issuers.clone())?,
        ledger: ledger.clone(),
        metrics: metrics.clone(),
        cancels: CancelRegistry::default(),
        sessions: Arc::new(Semaphore::new(cfg.max_sessions)),
        shutdown: stop_rx.clone(),
        cfg,
    });

    let ready_ledger = ledger.clone();
    let m = metrics.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let l = ready_ledger.clone();
                async move {
                    match l.status().await {
                        Ok(s) => (axum::http::StatusCode::OK, format!("ready ledger_size={}\n", s.size)),
                        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                    }
                }
            }),
        )
        .route("/metrics", get(move || {
            let m = m.clone();
            async move { m.render() }
        }));
    let mut http_stop = stop_rx.clone();
    tokio::spawn(async move {
        let _ = axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await;
    });

    let mut stop = stop_rx.clone();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => handle_connection(conn, shared).await,
                        Err(e) => warn!(%remote, error = %e, "QUIC handshake failed"),
                    }
                });
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    info!("proxy shutting down: no new connections; waiting for sessions");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while shared.sessions.available_permits() < shared.cfg.max_sessions && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    endpoint.close(0u32.into(), b"proxy shutting down");
    endpoint.wait_idle().await;
    info!("proxy stopped");
    Ok(())
}

/// Keeps this proxy run's lease with the ledger, renewing every third of its length. If the
/// proxy dies, the lease lapses and the ledger closes the run's open sessions with a
/// session-end event (reason `abandoned`), so the record says where each one stopped.
async fn keep_lease(ledger: LedgerClient, proxy_id: String, instance: String, ttl: Duration, mut stop: watch::Receiver<bool>) {
    let mut healthy = true;
    loop {
        match ledger.renew_lease(&proxy_id, &instance, ttl).await {
            Ok((_, abandoned)) => {
                if !healthy || abandoned > 0 {
                    info!(abandoned_sessions = abandoned, "proxy lease held");
                }
                healthy = true;
            }
            Err(e) => {
                if healthy {
                    warn!(error = %e, "cannot renew the proxy's lease with the ledger; if it lapses, the ledger closes this proxy's open sessions");
                }
                healthy = false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ttl / 3) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn handle_connection(conn: quinn::Connection, shared: Arc<Shared>) {
    let remote = conn.remote_address();
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let shared = shared.clone();
                tokio::spawn(async move { handle_stream(send, recv, remote, shared).await });
            }
            Err(quinn::ConnectionError::ApplicationClosed(_)) | Err(quinn::ConnectionError::LocallyClosed) => return,
            Err(e) => {
                info!(%remote, error = %e, "QUIC connection ended");
                return;
            }
        }
    }
}

async fn read_preamble(recv: &mut quinn::RecvStream) -> Result<StreamOpen, String> {
    let mut buf = BytesMut::with_capacity(4096);
    let fut = async {
        loop {
            match tunnel::decode::<StreamOpen>(&mut buf) {
                Ok(Some(m)) => return Ok((m, buf)),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let n = recv.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("stream closed before the preamble was complete".into());
            }
        }
    };
    let (open, rest) = tokio::time::timeout(PREAMBLE_TIMEOUT, fut)
        .await
        .map_err(|_| "no preamble within 10 s".to_string())??;
    if !rest.is_empty() {
        // A custody client waits for StreamAccept before sending protocol bytes.
        return Err("protocol bytes arrived before the preamble was accepted".into());
    }
    Ok(open)
}

async fn accept_reply(send: &mut quinn::SendStream, status: AcceptStatus, message: &str, session_id: &str, subject: &str) -> bool {
    let reply = StreamAccept {
        status: status as i32,
        message: message.to_string(),
        session_id: session_id.to_string(),
        protocol: "postgres".into(),
        subject: subject.to_string(),
    };
    send.write_all(&tunnel::encode(&reply)).await.is_ok()
}

async fn handle_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, remote: SocketAddr, shared: Arc<Shared>) {
    let open = match read_preamble(&mut recv).await {
        Ok(o) => o,
        Err(e) => {
            info!(%remote, error = %e, "bad stream preamble");
            let _ = accept_reply(&mut send, AcceptStatus::BadRequest, &format!("custody: {e}"), "", "").await;
            let _ = send.finish();
            return;
        }
    };
    if open.version != tunnel::VERSION {
        let msg = format!("custody: preamble version {} is not supported (this proxy speaks {})", open.version, tunnel::VERSION);
        let _ = accept_reply(&mut send, AcceptStatus::BadRequest, &msg, "", "").await;
        let _ = send.finish();
        return;
    }
    let session_id = uuid::Uuid::now_v7().to_string();
    let span = info_span!("session", session_id = %session_id, resource = %open.resource, %remote);
    async move {
        let refuse = |status: AcceptStatus, sqlstate: &'static str, msg: String| (status, sqlstate, msg);
        let checked: Result<_, (AcceptStatus, &'static str, String)> = async {
            let resource = shared
                .cfg
                .resource(&open.resource)
                .cloned()
                .ok_or_else(|| refuse(AcceptStatus::UnknownResource, "3D000", format!("custody: unknown resource {:?}", open.resource)))?;
            let mut identity = shared.validator.validate(&open.token).await.map_err(|e| {
                shared.metrics.auth_failures.inc();
                refuse(AcceptStatus::Unauthenticated, "28000", format!("custody: {e}"))
            })?;
            if identity.agent.is_empty() && !open.agent.is_empty() {
                identity.agent = open.agent.chars().take(256).collect();
                identity.agent_declared = true;
            }
            Ok((resource, identity))
        }
        .await;
        let (resource, identity) = match checked {
            Ok(v) => v,
            Err((status, sqlstate, msg)) => {
                info!(status = ?status, reason = %msg, "stream refused");
                if accept_reply(&mut send, status, &msg, "", "").await {
                    relay::reject(&mut recv, &mut send, sqlstate, &msg, None).await;
                }
                return;
            }
        };
        let template = Event {
            proxy_id: shared.cfg.proxy_id.clone(),
            proxy_instance: shared.instance.clone(),
            session_id: session_id.clone(),
            identity: Some(identity.clone()),
            resource: resource.name.clone(),
            protocol: Protocol::Postgres as i32,
            client_addr: if open.client_addr.is_empty() { remote.to_string() } else { format!("{} via {remote}", open.client_addr.chars().take(128).collect::<String>()) },
            ..Default::default()
        };
        let mut recorder = SessionRecorder::new(shared.ledger.clone(), template);

        if !policy::allows(&shared.cfg.policy, &identity, &resource.name) {
            shared.metrics.policy_denials.inc();
            let msg = format!(
                "custody: {} (groups {:?}) may not reach resource {:?}",
                identity.subject, identity.groups, resource.name
            );
            info!(subject = %identity.subject, "policy denied");
            recorder.record(
                EventKind::Denied,
                Body::Denied(Denied {
                    check: "policy".into(),
                    reason: msg.clone(),
                }),
            );
            recorder.start_flush();
            if let Err(e) = recorder.drain().await {
                warn!(error = %e, "could not record a policy denial");
            }
            if accept_reply(&mut send, AcceptStatus::PermissionDenied, &msg, &session_id, &identity.subject).await {
                relay::reject(&mut recv, &mut send, SQLSTATE_DENIED, &msg, None).await;
            }
            return;
        }
        if open.probe {
            let _ = accept_reply(&mut send, AcceptStatus::Accepted, "ok", &session_id, &identity.subject).await;
            let _ = send.finish();
            return;
        }
        let Ok(_permit) = shared.sessions.clone().try_acquire_owned() else {
            let msg = "custody: the proxy is at its session limit; try another proxy or retry later".to_string();
            if accept_reply(&mut send, AcceptStatus::Unavailable, &msg, "", "").await {
                relay::reject(&mut recv, &mut send, "53300", &msg, None).await;
            }
            return;
        };
        if !accept_reply(&mut send, AcceptStatus::Accepted, "ok", &session_id, &identity.subject).await {
            return;
        }
        shared.metrics.sessions_total.inc();
        shared.metrics.sessions_active.inc();
        info!(subject = %identity.subject, agent = %identity.agent, "session started");
        let ctx = SessionContext {
            resource,
            recorder,
            record_limit: shared.cfg.record_bytes_limit,
            max_message: shared.cfg.max_message_bytes,
            response_hold: std::time::Duration::from_millis(shared.cfg.response_hold_ms),
            cancels: shared.cancels.clone(),
            metrics: shared.metrics.clone(),
            shutdown: shared.shutdown.clone(),
        };
        let ending = relay::run(recv, send, ctx).await;
        shared.metrics.sessions_active.dec();
        info!(reason = ending.reason, detail = %ending.detail, "session ended");
    }
    .instrument(span)
    .await;
}
