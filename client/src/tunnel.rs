//! `custody connect`: a local TCP listener whose every connection is carried on its own QUIC
//! stream to the proxy, after a preamble naming the resource and carrying the token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use custody_proto::tunnel::{self, AcceptStatus, StreamAccept, StreamOpen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::quic::{self, Trust};
use crate::token;

/// Where and how to tunnel.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Resource name.
    pub resource: String,
    /// Proxy QUIC address.
    pub proxy: String,
    /// TLS server name.
    pub server_name: String,
    /// How to trust the proxy.
    pub trust: Trust,
    /// Local listen address.
    pub listen: std::net::SocketAddr,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// Agent name to declare.
    pub agent: Option<String>,
}

struct Link {
    endpoint: quinn::Endpoint,
    opts: ConnectOptions,
    conn: Mutex<Option<quinn::Connection>>,
}

impl Link {
    async fn connection(&self) -> anyhow::Result<quinn::Connection> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let addr = quic::resolve(&self.opts.proxy).await?;
        let c = self
            .endpoint
            .connect(addr, &self.opts.server_name)?
            .await
            .map_err(|e| anyhow!("cannot reach proxy {}: {e}", self.opts.proxy))?;
        *g = Some(c.clone());
        Ok(c)
    }

    /// Opens a stream and exchanges the preamble.
    async fn open(&self, client_addr: String, probe: bool) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream, StreamAccept)> {
        let (token, _src) = token::resolve(self.opts.token_file.as_deref()).await?;
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| anyhow!("opening a stream to the proxy: {e}"))?;
        let open = StreamOpen {
            version: tunnel::VERSION,
            resource: self.opts.resource.clone(),
            token,
            client_addr,
            agent: self.opts.agent.clone().unwrap_or_default(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            probe,
        };
        send.write_all(&tunnel::encode(&open)).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let accept = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(a) = tunnel::decode::<StreamAccept>(&mut buf)? {
                    return Ok::<_, anyhow::Error>(a);
                }
                if recv.read_buf(&mut buf).await? == 0 {
                    bail!("the proxy closed the stream without answering");
                }
            }
        })
        .await
        .map_err(|_| anyhow!("the proxy did not answer within 30 s"))??;
        Ok((send, recv, accept))
    }
}

fn status_name(s: i32) -> &'static str {
    match AcceptStatus::try_from(s) {
        Ok(AcceptStatus::Accepted) => "accepted",
        Ok(AcceptStatus::Unauthenticated) => "unauthenticated",
        Ok(AcceptStatus::PermissionDenied) => "permission denied",
        Ok(AcceptStatus::UnknownResource) => "unknown resource",
        Ok(AcceptStatus::BadRequest) => "bad request",
        Ok(AcceptStatus::LedgerUnavailable) => "ledger unavailable",
        Ok(AcceptStatus::Unavailable) => "unavailable",
        _ => "unknown status",
    }
}

/// Checks the token and access with a probe stream, then serves the local listener until
/// `shutdown` resolves.
pub async fn run(opts: ConnectOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let endpoint = quic::endpoint(&opts.trust)?;
    let link = Arc::new(Link {
        endpoint: endpoint.clone(),
        opts: opts.clone(),
        conn: Mutex::new(None),
    });
    // Fail fast, with the proxy's reason, before telling anyone to connect.
    let (_s, _r, accept) = link.open(String::new(), true).await?;
    if accept.status != AcceptStatus::Accepted as i32 {
        bail!("{} ({})", accept.message, status_name(accept.status));
    }
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    println!("listening on {}", listener.local_addr()?);
    println!(
        "connected to {} as {}; each connection is recorded in the audit ledger",
        opts.resource, accept.subject
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    tokio::pin!(shutdown);
    let tasks = tokio_util_tasks();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (tcp, peer) = match r {
                    Ok(v) => v,
                    Err(e) => { warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
                };
                let link = link.clone();
                tasks.spawn(async move {
                    if let Err(e) = carry(link, tcp, peer).await {
                        eprintln!("custody: connection from {peer}: {e:#}");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    eprintln!("custody: stopping; closing {} open connection(s)", tasks.len());
    if let Some(c) = link.conn.lock().await.take() {
        c.close(0u32.into(), b"client exiting");
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    Ok(())
}

fn tokio_util_tasks() -> TaskCounter {
    TaskCounter(Arc::new(std::sync::atomic::AtomicUsize::new(0)))
}

#[derive(Clone)]
struct TaskCounter(Arc<std::sync::atomic::AtomicUsize>);

impl TaskCounter {
    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
        let c = self.0.clone();
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            f.await;
            c.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    fn len(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn carry(link: Arc<Link>, tcp: TcpStream, peer: std::net::SocketAddr) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let (mut send, mut recv, accept) = link.open(peer.to_string(), false).await?;
    if accept.status != AcceptStatus::Accepted as i32 {
        // The proxy answers the caller in its own protocol (a FATAL for PostgreSQL); keep
        // piping so the caller sees it, and say why here too.
        eprintln!("custody: refused: {} ({})", accept.message, status_name(accept.status));
    } else {
        info!(session_id = %accept.session_id, %peer, "session opened");
    }
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let r = tokio::io::copy(&mut rd, &mut send).await;
        let _ = send.finish();
        r
    };
    let down = async {
        let r = tokio::io::copy(&mut recv, &mut wr).await;
        let _ = wr.shutdown().await;
        r
    };
    let (a, b) = tokio::join!(up, down);
    if let Err(e) = b {
        if !matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) {
            return Err(anyhow!("proxy stream: {e}"));
        }
    }
    let _ = a;
    Ok(())
}
