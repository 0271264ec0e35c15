//! The client's QUIC endpoint: TLS 1.3 to the proxy, verifying its certificate either by a
//! pinned SHA-256 fingerprint (dev and small setups) or against a CA bundle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// How to trust the proxy.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Accept exactly the certificate with this SHA-256.
    Pin([u8; 32]),
    /// Verify the chain against these PEM roots.
    CaFile(std::path::PathBuf),
}

impl Trust {
    /// Parses `sha256:<hex>`.
    pub fn pin(s: &str) -> anyhow::Result<Self> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        let b = hex::decode(h).context("pin must be sha256:<64 hex digits>")?;
        let a: [u8; 32] = b.try_into().map_err(|_| anyhow::anyhow!("pin must be 32 bytes of hex"))?;
        Ok(Trust::Pin(a))
    }
}

#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "proxy certificate sha256:{} does not match the pinned sha256:{}",
                hex::encode(got),
                hex::encode(self.pin)
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client endpoint trusting the proxy as `trust` says.
pub fn endpoint(trust: &Trust) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match trust {
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier { pin: *pin, provider }))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                roots.add(c?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![custody_proto::tunnel::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into()?));
    cfg.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Resolves `host:port`.
pub async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    let mut it = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving proxy address {addr}"))?;
    match it.next() {
        Some(a) => Ok(a),
        None => bail!("proxy address {addr} resolves to nothing"),
    }
}
