//! The QUIC listener's certificate: loading it, and making a self-signed one for dev use.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::{check_secret_file_mode, TlsConfig};

/// SHA-256 of a certificate, as `sha256:<hex>`: what clients pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert.as_ref())))
}

/// Loads the chain and key; returns the rustls server config for QUIC and the leaf's
/// fingerprint.
pub fn server_config(cfg: &TlsConfig) -> anyhow::Result<(rustls::ServerConfig, String)> {
    check_secret_file_mode(&cfg.key)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("reading certificate {}", cfg.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", cfg.cert.display()))?;
    let leaf = certs
        .first()
        .with_context(|| format!("{} holds no certificate", cfg.cert.display()))?;
    let fp = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("reading private key {}", cfg.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    sc.alpn_protocols = vec![custody_proto::tunnel::ALPN.to_vec()];
    sc.max_early_data_size = 0;
    Ok((sc, fp))
}

/// Writes a self-signed certificate for `names` to `dir/proxy.pem` and `dir/proxy-key.pem`
/// (mode 0600) and returns its fingerprint. For development only.
pub fn write_self_signed(dir: &Path, names: &[String]) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
    let cert_path = dir.join("proxy.pem");
    let key_path = dir.join("proxy-key.pem");
    std::fs::write(&cert_path, ck.cert.pem())?;
    let _ = std::fs::remove_file(&key_path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| format!("creating {}", key_path.display()))?;
    f.write_all(ck.signing_key.serialize_pem().as_bytes())?;
    Ok(fingerprint(ck.cert.der()))
}
