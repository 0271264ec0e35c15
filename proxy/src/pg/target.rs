//! The proxy's own connection to a PostgreSQL target: TCP, optional TLS, startup and
//! authentication (SCRAM-SHA-256, md5, or cleartext over TLS) with the gateway's credential.
//!
//! **Architecture Invariant:** the credential is used here and nowhere else, and no error
//! built here contains it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use custody_proto::pg::{
    self, decode_frame, password_message, sasl_initial_response, ssl_request, startup_message, Backend, Frame, Side,
};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls_pki_types::{CertificateDer, ServerName};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{ResourceConfig, Secret, TargetTls};

/// Why the gateway could not open a session on the target.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TargetError {
    /// TCP connect failed or timed out.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// Why.
        reason: String,
    },
    /// TLS was required but the server declined or the handshake failed.
    #[error("TLS to {addr} failed: {reason}")]
    Tls {
        /// host:port.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The target refused the gateway's credential or the startup.
    #[error("target refused the gateway's login as {user:?}: {message} (SQLSTATE {sqlstate})")]
    Refused {
        /// Role.
        user: String,
        /// SQLSTATE.
        sqlstate: String,
        /// Server message.
        message: String,
    },
    /// The target asked for an authentication method the gateway does not do.
    #[error("target asks for unsupported authentication method {0}")]
    UnsupportedAuth(String),
    /// The target broke the protocol.
    #[error("target protocol error: {0}")]
    Protocol(String),
    /// I/O failed mid-startup.
    #[error("target connection failed during startup: {0}")]
    Io(#[from] std::io::Error),
}

impl TargetError {
    /// SQLSTATE to report to the caller.
    pub fn sqlstate(&self) -> &str {
        match self {
            TargetError::Refused { sqlstate, .. } => sqlstate,
            TargetError::UnsupportedAuth(_) => "28000",
            _ => "08001",
        }
    }
}

/// Either a plain or TLS stream to the target.
pub enum TargetStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for TargetStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TargetStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            TargetStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TargetStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            TargetStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            TargetStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TargetStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            TargetStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TargetStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            TargetStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An authenticated target session, ready for queries.
pub struct TargetConn {
    /// The stream.
    pub stream: TargetStream,
    /// ParameterStatus, BackendKeyData and notices the server sent after authentication, to
    /// forward to the caller in order; ends with the first ReadyForQuery.
    pub startup_frames: Vec<Frame>,
    /// The backend's cancel key.
    pub cancel_key: Option<(i32, Bytes)>,
    /// Bytes read past the first ReadyForQuery.
    pub leftover: BytesMut,
    /// Whether TLS is in use.
    pub tls: bool,
}

/// Startup parameters a caller may pass through to the target.
pub const PASSTHROUGH_PARAMS: [&str; 6] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

fn tls_config(res: &ResourceConfig) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    match res.tls {
        TargetTls::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            match &res.ca_file {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                        let c: CertificateDer<'static> = c.map_err(|e| format!("{}: {e}", path.display()))?;
                        roots.add(c).map_err(|e| e.to_string())?;
                    }
                }
                None => {
                    for c in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(c);
                    }
                }
            }
            Ok(builder.with_root_certificates(roots).with_no_client_auth())
        }
        _ => Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()),
    }
}

/// `tls = "require"`: encrypt without verifying, as libpq's sslmode=require does.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Result<Frame, TargetError> {
    loop {
        if let Some(f) = decode_frame(buf, Side::Backend, 1 << 20).map_err(|e| TargetError::Protocol(e.to_string()))? {
            return Ok(f);
        }
        if s.read_buf(buf).await? == 0 {
            return Err(TargetError::Protocol("server closed the connection during startup".into()));
        }
    }
}

/// Connects and authenticates as the resource's gateway role.
pub async fn connect(
    res: &ResourceConfig,
    password: &Secret,
    database: &str,
    params: &[(String, String)],
) -> Result<TargetConn, TargetError> {
    tokio::time::timeout(STARTUP_TIMEOUT, connect_inner(res, password, database, params))
        .await
        .map_err(|_| TargetError::Unreachable {
            addr: format!("{}:{}", res.host, res.port),
            reason: "startup timed out".into(),
        })?
}

async fn connect_inner(
    res: &ResourceConfig,
    password: &Secret,
    database: &str,
    params: &[(String, String)],
) -> Result<TargetConn, TargetError> {
    let addr = format!("{}:{}", res.host, res.port);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| TargetError::Unreachable {
            addr: addr.clone(),
            reason: "connect timed out".into(),
        })?
        .map_err(|e| TargetError::Unreachable {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match res.tls {
        TargetTls::Disable => TargetStream::Plain(tcp),
        _ => {
            let mut tcp = tcp;
            tcp.write_all(&ssl_request()).await?;
            let mut b = [0u8; 1];
            tcp.read_exact(&mut b).await?;
            if b[0] != b'S' {
                return Err(TargetError::Tls {
                    addr,
                    reason: "server does not accept TLS (answered SSLRequest with N)".into(),
                });
            }
            let cfg = tls_config(res).map_err(|reason| TargetError::Tls {
                addr: addr.clone(),
                reason,
            })?;
            let name = ServerName::try_from(res.host.clone()).map_err(|e| TargetError::Tls {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| TargetError::Tls {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            TargetStream::Tls(Box::new(tls))
        }
    };
    let is_tls = matches!(stream, TargetStream::Tls(_));

    let mut startup: Vec<(&str, &str)> = vec![("user", res.user.as_str()), ("database", database)];
    for (k, v) in params {
        if PASSTHROUGH_PARAMS.contains(&k.as_str()) {
            startup.push((k.as_str(), v.as_str()));
        }
    }
    stream.write_all(&startup_message(&startup)).await?;

    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<ScramSha256> = None;
    loop {
        let f = read_frame(&mut stream, &mut buf).await?;
        let msg = Backend::parse(&f).map_err(|e| TargetError::Protocol(e.to_string()))?;
        match msg {
            Backend::Authentication { code: 0, .. } => break,
            Backend::Authentication { code: 3, .. } => {
                if !is_tls && res.host != "127.0.0.1" && res.host != "localhost" && res.host != "::1" {
                    return Err(TargetError::UnsupportedAuth(
                        "cleartext password over an unencrypted connection (set tls = \"verify-full\")".into(),
                    ));
                }
                let mut pw = password.expose().as_bytes().to_vec();
                pw.push(0);
                stream.write_all(&password_message(&pw)).await?;
            }
            Backend::Authentication { code: 5, data } => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| TargetError::Protocol("md5 salt is not 4 bytes".into()))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    res.user.as_bytes(),
                    password.expose().as_bytes(),
                    salt,
                );
                let mut pw = hash.into_bytes();
                pw.push(0);
                stream.write_all(&password_message(&pw)).await?;
            }
            Backend::Authentication { code: 10, data } => {
                let mechs: Vec<&[u8]> = data.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                if !mechs.iter().any(|m| *m == b"SCRAM-SHA-256") {
                    return Err(TargetError::UnsupportedAuth(format!(
                        "SASL mechanisms {:?}",
                        mechs.iter().map(|m| pg::lossy(m)).collect::<Vec<_>>()
                    )));
                }
                let s = ScramSha256::new(password.expose().as_bytes(), ChannelBinding::unsupported());
                stream
                    .write_all(&sasl_initial_response("SCRAM-SHA-256", s.message()))
                    .await?;
                scram = Some(s);
            }
            Backend::Authentication { code: 11, data } => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| TargetError::Protocol("SASL continue without SASL start".into()))?;
                s.update(data).map_err(|e| TargetError::Protocol(format!("SCRAM: {e}")))?;
                stream.write_all(&password_message(s.message())).await?;
            }
            Backend::Authentication { code: 12, data } => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| TargetError::Protocol("SASL final without SASL start".into()))?;
                s.finish(data)
                    .map_err(|e| TargetError::Protocol(format!("SCRAM server signature: {e}")))?;
            }
            Backend::Authentication { code, .. } => {
                return Err(TargetError::UnsupportedAuth(format!("authentication code {code}")))
            }
            Backend::ErrorResponse(f) => {
                return Err(TargetError::Refused {
                    user: res.user.clone(),
                    sqlstate: f.get(b'C').unwrap_or_default(),
                    message: f.get(b'M').unwrap_or_default(),
                })
            }
            Backend::NoticeResponse(_) | Backend::NegotiateProtocolVersion => {}
            _ => return Err(TargetError::Protocol("unexpected message during authentication".into())),
        }
    }
    let mut startup_frames = Vec::new();
    let mut cancel_key = None;
    loop {
        let f = read_frame(&mut stream, &mut buf).await?;
        let msg = Backend::parse(&f).map_err(|e| TargetError::Protocol(e.to_string()))?;
        match msg {
            Backend::ReadyForQuery { .. } => {
                startup_frames.push(f);
                break;
            }
            Backend::BackendKeyData { pid, key } => {
                cancel_key = Some((pid, Bytes::copy_from_slice(key)));
                startup_frames.push(f);
            }
            Backend::ErrorResponse(e) => {
                return Err(TargetError::Refused {
                    user: res.user.clone(),
                    sqlstate: e.get(b'C').unwrap_or_default(),
                    message: e.get(b'M').unwrap_or_default(),
                })
            }
            Backend::ParameterStatus { .. } | Backend::NoticeResponse(_) => startup_frames.push(f),
            _ => return Err(TargetError::Protocol("unexpected message after authentication".into())),
        }
    }
    Ok(TargetConn {
        stream,
        startup_frames,
        cancel_key,
        leftover: buf,
        tls: is_tls,
    })
}

/// Sends a CancelRequest for `key` to the resource's server.
pub async fn send_cancel(res: &ResourceConfig, pid: i32, key: &[u8]) -> Result<(), TargetError> {
    let addr = format!("{}:{}", res.host, res.port);
    let mut tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| TargetError::Unreachable {
            addr: addr.clone(),
            reason: "connect timed out".into(),
        })?
        .map_err(|e| TargetError::Unreachable {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    tcp.write_all(&pg::cancel_request(pid, key)).await?;
    // The server closes the connection after reading the request.
    let mut b = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut b)).await;
    Ok(())
}
