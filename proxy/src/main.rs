//! `custody-proxy`: runs a proxy node.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use custody_proxy::config::ProxyConfig;

#[derive(Parser)]
#[command(name = "custody-proxy", version, about = "custody's access proxy")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", env = "CUSTODY_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Serve {
        /// Config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file and exit.
    Check {
        /// Config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a self-signed QUIC certificate (development only) and print its fingerprint.
    GenCert {
        /// Directory for proxy.pem and proxy-key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// DNS names / IPs for the certificate.
        #[arg(long, default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        name: Vec<String>,
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
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
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
        Cmd::Serve { config } => {
            let cfg = ProxyConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(custody_proxy::server::run(cfg, shutdown_signal()))
        }
        Cmd::Check { config } => {
            ProxyConfig::load(&config)?;
            println!("ok: {} is valid", config.display());
            Ok(())
        }
        Cmd::GenCert { dir, name } => {
            let fp = custody_proxy::tls::write_self_signed(&dir, &name)?;
            println!("{fp}");
            Ok(())
        }
    }
}
