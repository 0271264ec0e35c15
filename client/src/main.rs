//! `custody`: log in, tunnel to resources through the proxy, and read the audit record.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use custody::config::ClientConfig;
use custody::query::{Filters, Format};
use custody::quic::Trust;

#[derive(Parser)]
#[command(name = "custody", version, about = "Reach production systems through custody; every statement is recorded")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run everything on loopback: ledger, proxy, dev identity provider, demo PostgreSQL.
    Dev {
        /// State directory (default ~/.local/share/custody/dev).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Do not start PostgreSQL.
        #[arg(long)]
        no_postgres: bool,
        /// Ledger nodes: 1, or 3 or 5 for a Raft cluster on loopback.
        #[arg(long, default_value_t = 1)]
        nodes: u64,
    },
    /// Log in with OpenID Connect (authorization code + PKCE, loopback redirect).
    Login {
        /// Issuer URL (default from config).
        #[arg(long)]
        issuer: Option<String>,
        /// OAuth client id (default from config, else custody-cli).
        #[arg(long)]
        client_id: Option<String>,
        /// Resource indicator for the access token (default from config).
        #[arg(long)]
        audience: Option<String>,
        /// Print the URL instead of opening a browser.
        #[arg(long)]
        no_browser: bool,
        /// Ask for a refresh token.
        #[arg(long)]
        offline: bool,
    },
    /// Forget the cached token.
    Logout,
    /// Open a local port tunnelled to a resource.
    Connect {
        /// Resource name, e.g. pg-prod.
        resource: String,
        /// Local port.
        #[arg(long, default_value_t = 5433)]
        port: u16,
        /// Local address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Proxy QUIC address (default from config).
        #[arg(long)]
        proxy: Option<String>,
        /// Pinned proxy certificate, sha256:<hex> (default from config).
        #[arg(long)]
        pin: Option<String>,
        /// CA bundle for the proxy certificate.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// TLS server name of the proxy.
        #[arg(long)]
        server_name: Option<String>,
        /// Read the token from this file (for CI), instead of CUSTODY_TOKEN or the login cache.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Name of the agent or skill acting for the token's subject (recorded).
        #[arg(long, env = "CUSTODY_AGENT")]
        agent: Option<String>,
    },
    /// Print recorded events.
    Events {
        #[command(flatten)]
        filters: Filters,
        /// Only this kind: session_start, request, response, denied, session_end, audit_query,
        /// export, legal_hold, prune.
        #[arg(long)]
        kind: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Show every column in table output.
        #[arg(long)]
        all_columns: bool,
        /// Prove every printed event is in a checkpoint signed by the pinned keys, and that
        /// the row matches the proven entry; fail otherwise.
        #[arg(long)]
        verify: bool,
        /// A pinned verifier key for --verify; repeatable (default: `ledger_keys` in the config).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// Print recorded sessions.
    Sessions {
        #[command(flatten)]
        filters: Filters,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// Check the ledger end to end: its latest checkpoint's signatures against pinned keys,
    /// consistency with the last checkpoint this machine verified, the hash chain, and the
    /// Merkle root of every entry; report the first bad index.
    Verify {
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
        /// A pinned verifier key; repeatable (default: `ledger_keys` in the config). Without
        /// any, checkpoints are not checked (and --offline refuses to run).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Verify an export (from `custody export`: a directory or s3://bucket/prefix) or a
        /// bundle (from `custody bundle`) instead of the live ledger.
        #[arg(long, value_name = "DIR")]
        offline: Option<String>,
    },
    /// Export sealed blocks as Parquet files, one per block, with a manifest holding the
    /// signed checkpoint and, per row, the inclusion proof in it. Blocks the target already
    /// holds are skipped, so the same command run nightly exports what is new.
    Export {
        /// A directory, file:///dir, or s3://bucket/prefix (credentials and endpoint from the
        /// AWS_* variables).
        target: String,
        /// Only blocks sealed at or after this time (RFC 3339 or a duration ago: 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only blocks sealed before this time.
        #[arg(long)]
        until: Option<String>,
        /// A pinned verifier key; repeatable (default: `ledger_keys` in the config).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// Place a legal hold on a session: retention never prunes its payloads while it holds.
    /// The hold (who placed it, and why) is recorded in the ledger.
    Hold {
        /// Session id (from `custody sessions`).
        session: String,
        /// Why, and on whose request (recorded with the hold).
        #[arg(long, required_unless_present = "release")]
        reason: Option<String>,
        /// Release the hold instead.
        #[arg(long)]
        release: bool,
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// List the sessions under a legal hold.
    Holds {
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// Write an export bundle for offline verification: the signed checkpoint, entries (with
    /// inclusion proofs for a partial range), block headers and consistency proofs.
    Bundle {
        /// Directory to write.
        #[arg(long)]
        out: PathBuf,
        /// First entry (default 0).
        #[arg(long)]
        from: Option<u64>,
        /// End of the range, exclusive (default: the checkpoint's size).
        #[arg(long)]
        to: Option<u64>,
        /// Add a consistency proof from this earlier tree size; repeatable.
        #[arg(long)]
        consistency_from: Vec<u64>,
        /// A pinned verifier key; repeatable (default: `ledger_keys` in the config).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// Print a recorded session as it happened: statements, parameters, result summaries and
    /// recorded rows, with the time since the session began.
    Replay {
        /// Session id (from `custody sessions`).
        session: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = custody::replay::ReplayFormat::Text)]
        format: custody::replay::ReplayFormat,
        /// Play back with the recorded pauses, this many times faster (1 = real time).
        #[arg(long)]
        speed: Option<f64>,
        /// Keep reading a live session until it ends.
        #[arg(long)]
        follow: bool,
        /// Most recorded rows to print per result.
        #[arg(long, default_value_t = 20)]
        max_rows: usize,
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// Print the ledger's block headers, checked to link one to the next.
    Blocks {
        /// One JSON object per block, with its canonical header bytes.
        #[arg(long)]
        json: bool,
        /// Ledger Flight URL (default from config).
        #[arg(long)]
        flight: Option<String>,
    },
    /// Print the ledger's latest checkpoint (C2SP signed note) exactly as signed, with one
    /// cosignature from each ledger node that answers.
    Checkpoint(CheckpointArgs),
    /// Print a Merkle proof from the ledger, one base64 hash per line, after checking it
    /// against the root the ledger gives (compare that root with one you saved).
    Proof {
        #[command(subcommand)]
        kind: ProofKind,
        /// Print JSON: the proof with the sizes, roots and (for inclusion) the entry's
        /// canonical bytes, so that another verifier can check it with no custody code.
        #[arg(long, global = true)]
        json: bool,
        /// Ledger Flight URL (default from config).
        #[arg(long, global = true)]
        flight: Option<String>,
    },
}

/// Options of `custody checkpoint`.
#[derive(clap::Args)]
struct CheckpointArgs {
    /// Tree size to sign (default: the last block's; the ledger's size before the first block).
    #[arg(long)]
    size: Option<u64>,
    /// A pinned verifier key (`name+keyid+base64`); repeat for each ledger node. Every
    /// signature by a pinned key must verify, and at least one must be present.
    #[arg(long = "key")]
    keys: Vec<String>,
    /// Ledger Flight URL (default from config).
    #[arg(long)]
    flight: Option<String>,
}

#[derive(Subcommand)]
enum ProofKind {
    /// That entry INDEX is in the tree of size N (default: the ledger's size).
    Inclusion {
        index: u64,
        #[arg(long)]
        size: Option<u64>,
    },
    /// That the tree of size N extends the tree of size M.
    Consistency { first: u64, second: Option<u64> },
}

fn flight_url(cfg: &ClientConfig, flag: Option<String>) -> anyhow::Result<String> {
    let f = flag.or_else(|| cfg.flight.clone());
    Ok(cfg.need(&f, "flight", "--flight grpc://HOST:PORT")?.to_string())
}

async fn ctrl_c() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = ClientConfig::load()?;
    match cli.cmd {
        Cmd::Dev { data_dir, no_postgres, nodes } => {
            let data_dir = data_dir.unwrap_or_else(|| {
                let base = std::env::var_os("XDG_DATA_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share"));
                base.join("custody/dev")
            });
            custody::dev::run(custody::dev::DevOptions { data_dir, no_postgres, nodes }).await
        }
        Cmd::Login { issuer, client_id, audience, no_browser, offline } => {
            let issuer = issuer.or(cfg.issuer.clone());
            let opts = custody::login::LoginOptions {
                issuer: cfg.need(&issuer, "issuer", "--issuer URL")?.to_string(),
                client_id: client_id.or(cfg.client_id.clone()).unwrap_or_else(|| "custody-cli".into()),
                audience: audience.or(cfg.audience.clone()).unwrap_or_default(),
                no_browser,
                offline,
                timeout: Duration::from_secs(300),
            };
            let tok = custody::login::login(&opts, |u| {
                eprintln!("Open this URL to log in:\n\n  {u}\n");
            })
            .await?;
            tok.save()?;
            println!("logged in; token cached in {}", custody::config::token_path().display());
            Ok(())
        }
        Cmd::Logout => {
            match std::fs::remove_file(custody::config::token_path()) {
                Ok(()) => println!("logged out"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("no cached token"),
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
        Cmd::Connect { resource, port, bind, proxy, pin, ca_file, server_name, token_file, agent } => {
            let proxy = proxy.or(cfg.proxy.clone());
            let proxy = cfg.need(&proxy, "proxy", "--proxy HOST:PORT")?.to_string();
            let trust = match (pin.or(cfg.pin.clone()), ca_file.or(cfg.ca_file.clone())) {
                (Some(p), _) => Trust::pin(&p)?,
                (None, Some(ca)) => Trust::CaFile(ca),
                (None, None) => anyhow::bail!("no way to trust the proxy: pass --pin sha256:<hex> or --ca-file, or set pin/ca_file in {}", custody::config::config_path().display()),
            };
            let opts = custody::tunnel::ConnectOptions {
                resource,
                server_name: server_name.or(cfg.server_name.clone()).unwrap_or_else(|| proxy.split(':').next().unwrap_or("localhost").to_string()),
                proxy,
                trust,
                listen: std::net::SocketAddr::new(bind, port),
                token_file,
                agent,
            };
            custody::tunnel::run(opts, ctrl_c()).await
        }
        Cmd::Events { filters, kind, format, all_columns, verify, keys, flight } => {
            let url = flight_url(&cfg, flight)?;
            if verify {
                let keys = if keys.is_empty() { cfg.ledger_keys.clone() } else { keys };
                custody::audit::events_verified(&url, &filters, kind.as_deref(), format, all_columns, &keys).await
            } else {
                custody::query::events(&url, &filters, kind.as_deref(), format, all_columns).await
            }
        }
        Cmd::Sessions { filters, format, flight } => {
            let url = flight_url(&cfg, flight)?;
            custody::query::sessions(&url, &filters, format).await
        }
        Cmd::Verify { flight, keys, offline } => {
            let keys = if keys.is_empty() { cfg.ledger_keys.clone() } else { keys };
            match offline {
                Some(dir) if !dir.starts_with("s3://") && !std::path::Path::new(dir.strip_prefix("file://").unwrap_or(&dir)).is_dir() => {
                    anyhow::bail!("{dir} is not a directory (an export from custody export, or a bundle from custody bundle)")
                }
                Some(dir) if custody::export::is_export(&dir) => custody::export::verify_export(&dir, &keys).await,
                Some(dir) => custody::audit::verify_offline(std::path::Path::new(&dir), &keys),
                None => custody::audit::verify(&flight_url(&cfg, flight)?, &keys).await,
            }
        }
        Cmd::Export { target, since, until, keys, flight } => {
            let url = flight_url(&cfg, flight)?;
            let keys = if keys.is_empty() { cfg.ledger_keys.clone() } else { keys };
            custody::export::export(&url, &target, since.as_deref(), until.as_deref(), &keys).await.map(|_| ())
        }
        Cmd::Hold { session, reason, release, flight } => {
            let url = flight_url(&cfg, flight)?;
            let r = custody::query::action(&url, "legal_hold", &serde_json::json!({"session_id": session, "reason": reason.unwrap_or_default(), "release": release})).await?;
            println!("{} session {session} (recorded at index {})", if release { "released the legal hold on" } else { "placed a legal hold on" }, r["index"]);
            if r["pruned_before_hold"] == true {
                eprintln!("custody: warning: some of this session's entries were pruned before the hold; their payloads are only in the retention archive");
            }
            Ok(())
        }
        Cmd::Holds { flight } => {
            let r = custody::query::action(&flight_url(&cfg, flight)?, "legal_holds", &serde_json::json!({})).await?;
            let holds = r["holds"].as_array().cloned().unwrap_or_default();
            if holds.is_empty() {
                println!("(no legal holds)");
            }
            for h in holds {
                println!("{}\t{}", h["session_id"].as_str().unwrap_or(""), h["reason"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        Cmd::Bundle { out, from, to, consistency_from, keys, flight } => {
            let url = flight_url(&cfg, flight)?;
            let keys = if keys.is_empty() { cfg.ledger_keys.clone() } else { keys };
            custody::audit::bundle(&url, &out, from, to, &consistency_from, &keys).await
        }
        Cmd::Replay { session, format, speed, follow, max_rows, flight } => {
            let url = flight_url(&cfg, flight)?;
            if speed.is_some_and(|s| !(s > 0.0)) {
                anyhow::bail!("--speed must be a positive number (1 = real time)");
            }
            custody::replay::replay(&url, &custody::replay::ReplayOptions { session, format, speed, follow, max_rows }).await
        }
        Cmd::Blocks { json, flight } => custody::audit::blocks(&flight_url(&cfg, flight)?, json).await,
        Cmd::Checkpoint(a) => {
            let url = flight_url(&cfg, a.flight)?;
            let keys = if a.keys.is_empty() { cfg.ledger_keys.clone() } else { a.keys };
            let note = custody::query::checkpoint(&url, a.size, &keys).await?;
            print!("{note}");
            Ok(())
        }
        Cmd::Proof { kind, json, flight } => {
            let url = flight_url(&cfg, flight)?;
            let p = match kind {
                ProofKind::Inclusion { index, size } => custody::query::inclusion_proof(&url, index, size).await?,
                ProofKind::Consistency { first, second } => custody::query::consistency_proof(&url, first, second).await?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                for h in p["proof"].as_array().into_iter().flatten() {
                    println!("{}", h.as_str().unwrap_or_default());
                }
            }
            Ok(())
        }
    }
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new().context("starting the async runtime") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("custody: error: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("custody: error: {e:#}");
        std::process::exit(1);
    }
}
