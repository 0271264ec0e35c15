//! `custody-ledger`: runs a ledger node, and checks a ledger's data offline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use custody_ledger::config::LedgerConfig;
use custody_ledger::store::Store;
use custody_ledger::verify::verify_store;

#[derive(Parser)]
#[command(name = "custody-ledger", version, about = "custody's audit ledger node")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", env = "CUSTODY_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a ledger node.
    Serve {
        /// Config file (TOML). Flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// RocksDB data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// gRPC listen address (Append API and Arrow Flight).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// HTTP listen address (health and metrics).
        #[arg(long)]
        http_listen: Option<std::net::SocketAddr>,
    },
    /// Walk a stopped ledger's data directory and verify the hash chain.
    Verify {
        /// RocksDB data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.log_format);
    match cli.cmd {
        Cmd::Serve {
            config,
            data_dir,
            listen,
            http_listen,
        } => {
            let mut cfg = match config {
                Some(p) => LedgerConfig::load(&p)?,
                None => LedgerConfig {
                    node_id: "ledger-1".into(),
                    data_dir: data_dir.clone().context("--data-dir or --config is required")?,
                    listen: "127.0.0.1:7400".parse()?,
                    http_listen: "127.0.0.1:7401".parse()?,
                    max_event_bytes: 1 << 20,
                },
            };
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(l) = http_listen {
                cfg.http_listen = l;
            }
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(custody_ledger::server::run(cfg, shutdown_signal()))
        }
        Cmd::Verify { data_dir } => {
            let store = Store::open(&data_dir)
                .with_context(|| format!("opening {} (is a ledger still running on it?)", data_dir.display()))?;
            match verify_store(&store) {
                Ok(r) => {
                    println!("ok: {} entries verified, head {}", r.verified, r.head);
                    Ok(())
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
