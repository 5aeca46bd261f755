//! The listener's TLS: rustls with TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
//!
//! One crypto provider (ring) is installed explicitly at start-up by
//! [`install_crypto_provider`]; every rustls config in the process uses it.

use std::{path::Path, sync::Arc};

use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no PEM certificate.
    #[error("{path}: no usable PEM certificate: {why}")]
    Certificate {
        /// The file.
        path: String,
        /// The cause.
        why: String,
    },
    /// The key file is unreadable or holds no PEM private key.
    #[error("{path}: no usable PEM private key: {why}")]
    PrivateKey {
        /// The file.
        path: String,
        /// The cause.
        why: String,
    },
    /// rustls refused the pair (for example, the key does not match the certificate).
    #[error("certificate and key cannot be used together: {0}")]
    Pair(#[from] rustls::Error),
    /// The private key is not the certificate's key.
    #[error("the private key {key} does not match the certificate {cert}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
}

/// Installs ring as the process-wide rustls crypto provider (a no-op after the first call).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads the certificate chain at `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |why: String| TlsError::Certificate {
        path: path.display().to_string(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("the file has no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Reads the private key at `path` (PKCS#8, RSA or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::PrivateKey {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// The listener's cipher suites, in the order it picks them: Mozilla's server-side TLS
/// guidelines ("modern" for TLS 1.3, "intermediate" for 1.2), AES-128-GCM, then AES-256-GCM,
/// then ChaCha20-Poly1305, all forward-secret AEAD suites. rustls's own list starts with
/// AES-256-GCM-SHA384, whose TLS 1.3 key schedule runs on SHA-384, computed in software on x86
/// and ARM where SHA-256 has instructions of its own: every handshake costs both ends more for
/// no security a 128-bit key lacks.
const LISTENER_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::ring::cipher_suite::*;
    &[
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// ring, with the listener's suites in [`LISTENER_SUITES`] order.
fn listener_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: LISTENER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    })
}

/// Builds the listener's rustls config around a certificate resolver (see [`crate::certs`]),
/// so the certificate can change while the listener runs.
///
/// Resumption: TLS 1.3 session tickets are stateless, the session encrypted into the ticket
/// (ChaCha20-Poly1305) under a key made at start and replaced every 6 hours, tickets under the
/// previous key still taken (rustls's `Ticketer`: 12 hours at most), so any number of clients
/// can resume, as with nginx's default `ssl_session_tickets on`. rustls's own default keeps
/// sessions in a 256-entry cache instead, so beyond 256 clients the oldest lost theirs and paid
/// a full handshake (signature and certificate) on their next connection. TLS 1.2 clients get
/// RFC 5077 tickets the same way, or that cache of session ids when they do not take tickets.
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    install_crypto_provider();
    let mut config = ServerConfig::builder_with_provider(listener_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.3 and 1.2 with these suites")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Pick the cipher suite in the server's order (LISTENER_SUITES), not the client's.
    config.ignore_client_order = true;
    // One TLS 1.3 session ticket a handshake, not rustls's two: a client resumes with one and
    // gets a fresh one each time (OpenSSL servers also send one after a resumption). Each ticket
    // costs the client a session object; wrk spent ~13% more CPU per new connection with two.
    config.send_tls13_tickets = 1;
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Writes a self-signed certificate for `localhost` and `127.0.0.1` to `dir/gateway.crt` and
/// its key to `dir/gateway.key` (mode 0600, written atomically). For local use only.
pub fn write_dev_cert(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let cert_path = dir.join("gateway.crt");
    let key_path = dir.join("gateway.key");
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, certified.cert.pem())?;
    Ok((cert_path, key_path))
}

/// Writes `bytes` to `path` through a temporary file created with mode 0600, then renames it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("key.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
