//! The Raft transport between ledger nodes: TCP with mutual TLS 1.3, length-prefixed frames.
//!
//! Every node dials every other node once and only sends on that connection; what it receives
//! arrives on the connections its peers dialled. A connection opens with a [`PeerHello`]
//! (cluster id, sender, recipient, purpose) that the receiver checks against its own identity
//! and against the client certificate, which must be valid for the DNS name `ledger-<id>` of
//! the sender and chain to the cluster's CA. The receiver answers with a [`PeerRefusal`]
//! (empty reason: accepted) so that a refused dialler logs why.
//!
//! A Raft snapshot message carries only a [`SnapshotDescriptor`]; the receiver fetches the
//! checkpoint files from the leader on a `FETCH_SNAPSHOT` connection before it hands the
//! message to Raft, so the Ready loop installs a snapshot that is already on local disk.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use custody_proto::pb::ledger::{peer_hello, FileChunk, Member, PeerHello, PeerRefusal, SnapshotDescriptor};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::layout::DataLayout;
use crate::node::{Input, NodeHandle, Transport};

/// Largest frame accepted on a peer connection (a Raft entry can hold a 16 MiB batch).
pub const MAX_FRAME: usize = 64 << 20;
const SNAPSHOT_CHUNK: usize = 1 << 20;
const QUEUE_PER_PEER: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The DNS name a node's certificate must carry.
pub fn peer_name(id: u64) -> String {
    format!("ledger-{id}")
}

/// Mutual-TLS configuration for peer connections.
#[derive(Clone)]
pub struct PeerTls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            bail!("{} is readable by others (mode {:o}); chmod 600 it", path.display(), mode & 0o777);
        }
    }
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("parsing the private key in {}", path.display()))
}

impl PeerTls {
    /// Loads the cluster CA, this node's certificate chain and its key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(ca)? {
            roots.add(c).context("adding the cluster CA")?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(cert)?;
        let key = read_key(key)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .context("building the peer certificate verifier")?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("this node's certificate and key do not match")?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("this node's certificate and key do not match")?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Writes a CA and certificates for nodes `ids` into `dir` (`ca.pem`, `ca-key.pem`,
/// `ledger-<id>.pem`, `ledger-<id>-key.pem`; keys mode 0600). For development and tests;
/// production clusters use their own PKI with the same names in the certificates.
pub fn generate_certs(dir: &Path, ids: &[u64]) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "custody ledger cluster CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    write_private(&dir.join("ca-key.pem"), ca_key.serialize_pem().as_bytes())?;
    let issuer = Issuer::new(ca, ca_key);
    for id in ids {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![peer_name(*id), "localhost".to_string(), "127.0.0.1".to_string()])?;
        p.distinguished_name.push(DnType::CommonName, peer_name(*id));
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{}.pem", peer_name(*id))), cert.pem())?;
        write_private(&dir.join(format!("{}-key.pem", peer_name(*id))), key.serialize_pem().as_bytes())?;
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

/// Writes one frame: u32 BE length, then the bytes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(bytes).await
}

/// Reads one frame of at most `max` bytes; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

struct Inner {
    id: u64,
    cluster_id: String,
    tls: PeerTls,
    layout: DataLayout,
    rt: tokio::runtime::Handle,
    /// Addresses from the replicated membership.
    addrs: RwLock<HashMap<u64, String>>,
    /// Local overrides (e.g. a relay in tests, or NAT): used instead of the member address.
    overrides: HashMap<u64, String>,
    /// Addresses peers announced in their hello, for nodes not (yet) in the membership.
    learned: RwLock<HashMap<u64, String>>,
    /// This node's own peer address, announced in its hellos.
    advertise: String,
    senders: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    node: RwLock<Option<NodeHandle>>,
    /// Snapshots being fetched now. The leader may send the same snapshot message again
    /// while its fetch runs; a second fetch into the same directory would corrupt the first.
    fetching: Mutex<HashSet<String>>,
}

/// This node's side of the peer network.
#[derive(Clone)]
pub struct PeerNet {
    inner: Arc<Inner>,
}

impl PeerNet {
    /// A network for node `id`; `overrides` replace member addresses when dialling.
    pub fn new(id: u64, cluster_id: &str, tls: PeerTls, layout: DataLayout, overrides: HashMap<u64, String>, advertise: String, rt: tokio::runtime::Handle) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                cluster_id: cluster_id.into(),
                tls,
                layout,
                rt,
                addrs: RwLock::default(),
                overrides,
                learned: RwLock::default(),
                advertise,
                senders: Mutex::default(),
                node: RwLock::default(),
                fetching: Mutex::default(),
            }),
        }
    }

    /// Connects the network to the node it feeds (after the node is built).
    pub fn attach(&self, node: NodeHandle) {
        *self.inner.node.write().unwrap_or_else(|p| p.into_inner()) = Some(node);
    }

    /// Accepts peer connections on `listener` until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.inner.tls.server.clone());
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let inner = self.inner.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_conn(inner, acceptor, tcp).await {
                    warn!(peer_addr = %addr, error = %format!("{e:#}"), "peer connection refused or failed");
                }
            });
        }
    }
}

fn node(inner: &Inner) -> Option<NodeHandle> {
    inner.node.read().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Transport for PeerNet {
    fn send(&self, msgs: Vec<Message>) {
        let mut senders = self.inner.senders.lock().unwrap_or_else(|p| p.into_inner());
        for m in msgs {
            if m.to == self.inner.id {
                continue;
            }
            let to = m.to;
            let tx = senders.entry(to).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_PER_PEER);
                let inner = self.inner.clone();
                self.inner.rt.spawn(sender_loop(inner, to, rx));
                tx
            });
            if tx.try_send(m).is_err() {
                debug!(to, "peer queue full; dropping a raft message (raft resends)");
            }
        }
    }

    fn set_members(&self, members: &[Member]) {
        let mut addrs = self.inner.addrs.write().unwrap_or_else(|p| p.into_inner());
        addrs.clear();
        for m in members {
            addrs.insert(m.id, m.peer_addr.clone());
        }
        // Stop dialling nodes that left.
        let mut senders = self.inner.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders.retain(|id, _| addrs.contains_key(id));
    }
}

fn addr_of(inner: &Inner, id: u64) -> Option<String> {
    inner
        .overrides
        .get(&id)
        .cloned()
        .or_else(|| inner.addrs.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned().filter(|a| !a.is_empty()))
        .or_else(|| inner.learned.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned())
        .filter(|a| !a.is_empty())
}

type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

async fn dial(inner: &Inner, to: u64, purpose: peer_hello::Purpose, snapshot: &str) -> anyhow::Result<TlsClient> {
    let addr = addr_of(inner, to).ok_or_else(|| anyhow!("no address known for node {to}"))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| anyhow!("connecting to node {to} at {addr} timed out"))?
        .with_context(|| format!("connecting to node {to} at {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(peer_name(to)).map_err(|e| anyhow!("{e}"))?;
    let connector = tokio_rustls::TlsConnector::from(inner.tls.client.clone());
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake with node {to} at {addr} timed out"))?
        .with_context(|| format!("TLS handshake with node {to} at {addr} (is its certificate for {} and from this cluster's CA?)", peer_name(to)))?;
    let hello = PeerHello {
        cluster_id: inner.cluster_id.clone(),
        from: inner.id,
        to,
        purpose: purpose as i32,
        snapshot: snapshot.to_string(),
        from_peer_addr: inner.advertise.clone(),
    };
    write_frame(&mut tls, &hello.encode_to_vec()).await?;
    tls.flush().await?;
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut tls, 64 << 10))
        .await
        .map_err(|_| anyhow!("node {to} at {addr} did not answer the peer hello"))??
        .ok_or_else(|| anyhow!("node {to} at {addr} closed the connection during the hello"))?;
    let refusal = PeerRefusal::decode(&answer[..]).context("node's answer to the hello")?;
    if !refusal.reason.is_empty() {
        bail!("node {to} at {addr} refused this node: {}", refusal.reason);
    }
    Ok(tls)
}

async fn sender_loop(inner: Arc<Inner>, to: u64, mut rx: mpsc::Receiver<Message>) {
    let mut backoff = Duration::from_millis(100);
    let mut last_warning: Option<std::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        let conn = dial(&inner, to, peer_hello::Purpose::Raft, "").await;
        let mut conn = match conn {
            Ok(c) => {
                if last_warning.is_some() {
                    info!(peer = to, "peer connection restored");
                }
                backoff = Duration::from_millis(100);
                last_warning = None;
                c
            }
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!(peer = to, error = %format!("{e:#}"), "cannot reach peer");
                    last_warning = Some(std::time::Instant::now());
                }
                if let Some(n) = node(&inner) {
                    let _ = n.send(Input::Unreachable(to));
                    if first.get_msg_type() == MessageType::MsgSnapshot {
                        let _ = n.send(Input::SnapshotSent { to, ok: false });
                    }
                }
                // Drop what queued while the peer was away; Raft will resend what matters.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut next = Some(first);
        loop {
            let m = match next.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let bytes = m.write_to_bytes().unwrap_or_default();
            let mut r = write_frame(&mut conn, &bytes).await;
            // Write whatever else is queued before flushing.
            while r.is_ok() {
                match rx.try_recv() {
                    Ok(m2) => {
                        if m2.get_msg_type() == MessageType::MsgSnapshot {
                            next = Some(m2);
                            break;
                        }
                        r = write_frame(&mut conn, &m2.write_to_bytes().unwrap_or_default()).await;
                    }
                    Err(_) => break,
                }
            }
            if r.is_ok() {
                r = conn.flush().await;
            }
            if snapshot {
                if let Some(n) = node(&inner) {
                    let _ = n.send(Input::SnapshotSent { to, ok: r.is_ok() });
                }
            }
            if let Err(e) = r {
                debug!(peer = to, error = %e, "peer connection lost");
                if let Some(n) = node(&inner) {
                    let _ = n.send(Input::Unreachable(to));
                }
                break;
            }
        }
    }
}

type TlsServer = tokio_rustls::server::TlsStream<TcpStream>;

async fn refuse(tls: &mut TlsServer, reason: String) -> anyhow::Error {
    let _ = write_frame(tls, &PeerRefusal { reason: reason.clone() }.encode_to_vec()).await;
    let _ = tls.flush().await;
    let _ = tls.shutdown().await;
    anyhow!(reason)
}

async fn serve_conn(inner: Arc<Inner>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))?
        .context("TLS handshake failed (a certificate not from this cluster's CA?)")?;
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut tls, 64 << 10))
        .await
        .map_err(|_| anyhow!("no peer hello"))??
        .ok_or_else(|| anyhow!("closed before the peer hello"))?;
    let hello = PeerHello::decode(&hello[..]).context("malformed peer hello")?;
    if hello.cluster_id != inner.cluster_id {
        return Err(refuse(&mut tls, format!("node {} belongs to cluster {:?}, this node to {:?}", hello.from, hello.cluster_id, inner.cluster_id)).await);
    }
    if hello.to != inner.id {
        return Err(refuse(&mut tls, format!("this is node {}, not node {}", inner.id, hello.to)).await);
    }
    // The certificate must be the sender's own: valid for ledger-<from>.
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
    let Some(cert) = cert else {
        return Err(refuse(&mut tls, "no client certificate".into()).await);
    };
    let name = ServerName::try_from(peer_name(hello.from)).map_err(|e| anyhow!("{e}"))?;
    let valid = webpki::EndEntityCert::try_from(&cert).is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok());
    if !valid {
        return Err(refuse(&mut tls, format!("the client certificate is not valid for {}; a node may only speak for itself", peer_name(hello.from))).await);
    }
    let Some(node) = node(&inner) else {
        return Err(refuse(&mut tls, "node not ready".into()).await);
    };
    if node.status().removed.contains(&hello.from) {
        return Err(refuse(&mut tls, format!("node {} was removed from this cluster", hello.from)).await);
    }
    if !hello.from_peer_addr.is_empty() && hello.from_peer_addr.len() <= 256 {
        // Authenticated by the certificate check above: only ledger-<from> can claim it.
        inner.learned.write().unwrap_or_else(|p| p.into_inner()).insert(hello.from, hello.from_peer_addr.clone());
    }
    write_frame(&mut tls, &PeerRefusal::default().encode_to_vec()).await?;
    tls.flush().await?;
    match peer_hello::Purpose::try_from(hello.purpose) {
        Ok(peer_hello::Purpose::Raft) => receive_raft(&inner, &node, hello.from, tls).await,
        Ok(peer_hello::Purpose::FetchSnapshot) => serve_snapshot(&inner, &hello.snapshot, tls).await,
        Err(_) => bail!("unknown peer purpose {}", hello.purpose),
    }
}

async fn receive_raft(inner: &Arc<Inner>, node: &NodeHandle, from: u64, mut tls: TlsServer) -> anyhow::Result<()> {
    while let Some(frame) = read_frame(&mut tls, MAX_FRAME).await? {
        let m = Message::parse_from_bytes(&frame).context("malformed raft message")?;
        if m.from != from || m.to != inner.id {
            bail!("node {from} sent a message from {} to {}", m.from, m.to);
        }
        if m.get_msg_type() == MessageType::MsgSnapshot {
            let desc = SnapshotDescriptor::decode(&m.get_snapshot().data[..]).context("snapshot descriptor")?;
            if m.get_snapshot().get_metadata().index <= node.status().applied {
                debug!(snapshot = %desc.name, "a snapshot older than what this node applied; dropped");
                continue;
            }
            let Some(guard) = FetchGuard::claim(inner, &desc.name) else {
                debug!(snapshot = %desc.name, "already fetching this snapshot; dropped the repeated message");
                continue;
            };
            let inner = inner.clone();
            let node = node.clone();
            // Fetch off the read loop, then hand the message to Raft. On failure it is
            // dropped; the leader sends the snapshot again.
            tokio::spawn(async move {
                let _guard = guard;
                let index = m.get_snapshot().get_metadata().index;
                match fetch_snapshot(&inner, &desc, index).await {
                    Ok(()) => {
                        let _ = node.send(Input::Raft(Box::new(m)));
                    }
                    Err(e) => warn!(leader = desc.leader_id, snapshot = %desc.name, error = %format!("{e:#}"), "fetching a snapshot failed"),
                }
            });
            continue;
        }
        if node.send(Input::Raft(Box::new(m))).is_err() {
            debug!(from, "node queue full; dropped a raft message");
        }
    }
    Ok(())
}

/// Marks a snapshot as being fetched, until dropped (also on a panic or a cancelled task).
struct FetchGuard {
    inner: Arc<Inner>,
    name: String,
}

impl FetchGuard {
    fn claim(inner: &Arc<Inner>, name: &str) -> Option<Self> {
        inner.fetching.lock().ok()?.insert(name.to_string()).then(|| Self { inner: inner.clone(), name: name.to_string() })
    }
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        if let Ok(mut f) = self.inner.fetching.lock() {
            f.remove(&self.name);
        }
    }
}

/// How long a snapshot stream may stall before the fetch is abandoned (and retried when
/// the leader sends the snapshot again).
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);

fn safe_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 128 && !n.contains('/') && !n.contains('\0') && n != "." && n != ".."
}

async fn serve_snapshot(inner: &Inner, name: &str, mut tls: TlsServer) -> anyhow::Result<()> {
    if !safe_name(name) || !name.starts_with("snap-") {
        bail!("refused a fetch of {name:?}");
    }
    let dir = inner.layout.snapshots_out().join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("snapshot {name} is not here"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for p in files {
        let fname = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut f = tokio::fs::File::open(&p).await?;
        let mut offset = 0u64;
        loop {
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            let n = f.read(&mut buf).await?;
            if n == 0 && offset > 0 {
                break;
            }
            buf.truncate(n);
            let chunk = FileChunk { name: fname.clone(), offset, data: buf.into(), done: false };
            write_frame(&mut tls, &chunk.encode_to_vec()).await?;
            offset += n as u64;
            if n == 0 {
                break;
            }
        }
    }
    write_frame(&mut tls, &FileChunk { done: true, ..Default::default() }.encode_to_vec()).await?;
    tls.flush().await?;
    Ok(())
}

/// Fetches the checkpoint `desc` names from its leader into `snapshots/in/<name>`, and checks
/// that it opens and holds the state at `index` before Raft hears of it: once Raft has
/// stepped a snapshot message, a snapshot that cannot be installed stops the node.
async fn fetch_snapshot(inner: &Inner, desc: &SnapshotDescriptor, index: u64) -> anyhow::Result<()> {
    if desc.cluster_id != inner.cluster_id {
        bail!("snapshot from cluster {:?}, this node is in {:?}", desc.cluster_id, inner.cluster_id);
    }
    if !safe_name(&desc.name) || desc.files.iter().any(|f| !safe_name(&f.name)) {
        bail!("snapshot names an unsafe path");
    }
    let done = inner.layout.snapshots_in().join(&desc.name);
    if done.exists() {
        return Ok(());
    }
    let tmp = inner.layout.snapshots_in().join(format!("{}.part", desc.name));
    let _ = tokio::fs::remove_dir_all(&tmp).await;
    tokio::fs::create_dir_all(&tmp).await?;
    let mut conn = dial(inner, desc.leader_id, peer_hello::Purpose::FetchSnapshot, &desc.name).await?;
    let expected: HashMap<&str, u64> = desc.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
    let mut got: HashMap<String, u64> = HashMap::new();
    let mut open: Option<(String, tokio::fs::File)> = None;
    loop {
        let frame = tokio::time::timeout(SNAPSHOT_STALL, read_frame(&mut conn, SNAPSHOT_CHUNK + 4096))
            .await
            .map_err(|_| anyhow!("the snapshot stream stalled for {SNAPSHOT_STALL:?}"))??
            .ok_or_else(|| anyhow!("the leader closed the snapshot stream early"))?;
        let c = FileChunk::decode(&frame[..]).context("malformed snapshot chunk")?;
        if c.done {
            break;
        }
        let Some(&size) = expected.get(c.name.as_str()) else {
            bail!("the leader sent {:?}, which the snapshot does not list", c.name);
        };
        let have = got.entry(c.name.clone()).or_default();
        if c.offset != *have || *have + c.data.len() as u64 > size {
            bail!("snapshot file {} arrived out of order or too long", c.name);
        }
        if open.as_ref().is_none_or(|(n, _)| *n != c.name) {
            if let Some((_, f)) = open.take() {
                f.sync_all().await?;
            }
            open = Some((c.name.clone(), tokio::fs::File::create(tmp.join(&c.name)).await?));
        }
        if let Some((_, f)) = open.as_mut() {
            f.write_all(&c.data).await?;
        }
        *have += c.data.len() as u64;
    }
    if let Some((_, f)) = open.take() {
        f.sync_all().await?;
    }
    for (name, size) in &expected {
        if got.get(*name).copied().unwrap_or(0) != *size {
            bail!("snapshot file {name} is incomplete");
        }
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    let check = tmp.clone();
    tokio::task::spawn_blocking(move || crate::node::check_checkpoint(&check, index))
        .await
        .context("checking the fetched snapshot")?
        .map_err(|e| anyhow!("the fetched snapshot is unusable: {e}"))?;
    tokio::fs::rename(&tmp, &done).await?;
    info!(snapshot = %desc.name, files = desc.files.len(), bytes = expected.values().sum::<u64>(), "fetched a snapshot from the leader");
    Ok(())
}
