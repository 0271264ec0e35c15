//! Runs a single-node ledger: opens the store, starts group commit, and serves gRPC
//! (Append + Flight) and HTTP (health, metrics) until shutdown.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use axum::routing::get;
use custody_proto::pb::ledger::ledger_server::LedgerServer;
use tokio::net::TcpListener;
use tracing::info;

use crate::committer::{CommitLimits, Committer};
use crate::config::LedgerConfig;
use crate::flight::LedgerFlight;
use crate::metrics::LedgerMetrics;
use crate::service::LedgerService;
use crate::state::LedgerState;
use crate::store::Store;

/// Largest gRPC message accepted (an append batch).
pub const MAX_GRPC_MESSAGE: usize = 64 << 20;

/// Serves until `shutdown` resolves, then drains the commit queue and flushes.
pub async fn run(cfg: LedgerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let store = Arc::new(
        Store::open(&cfg.data_dir)
            .with_context(|| format!("opening ledger store in {}", cfg.data_dir.display()))?,
    );
    let state = LedgerState::load(&store).context(
        "the ledger's stored state is inconsistent; run `custody-ledger verify` to find the damage",
    )?;
    info!(node_id = %cfg.node_id, size = state.next_index, head = %hex::encode(state.head), "ledger opened");
    let metrics = Arc::new(LedgerMetrics::new());
    let limits = CommitLimits {
        max_event_bytes: cfg.max_event_bytes,
        ..CommitLimits::default()
    };
    let (committer, commit_thread) = Committer::start(store.clone(), state, limits, metrics.clone());

    let service = LedgerService::new(
        &cfg.node_id,
        &cfg.data_dir.display().to_string(),
        committer.clone(),
        limits,
    );
    let flight = LedgerFlight::new(store.clone(), committer.clone());

    let grpc = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding gRPC listener {}", cfg.listen))?;
    let http = TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", cfg.http_listen))?;
    info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "ledger listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let health_committer = committer.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let st = health_committer.state();
                async move { format!("ready size={}\n", st.next_index) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        );
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let mut grpc_stop = stop_rx.clone();
    tonic::transport::Server::builder()
        .add_service(
            LedgerServer::new(service)
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(
            FlightServiceServer::new(flight)
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc), async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        })
        .await
        .context("gRPC server failed")?;
    info!("ledger shutting down: draining appends");
    drop(committer);
    let _ = http_task.await;
    tokio::task::spawn_blocking(move || commit_thread.join())
        .await
        .ok();
    info!("ledger stopped");
    Ok(())
}
