//! Certificate hot reload: the listener's certificate lives behind one `ArcSwap`.
//!
//! [`CertStore`] is the rustls [`ResolvesServerCert`] of the listener: each handshake takes the
//! current pair with one `load`, so a swap reaches the next handshake while open connections go
//! on with the certificate they were made with. The watcher observes the directories of the
//! certificate and key files (renewal tools replace files by rename or by swapping a symlink)
//! and also acts on SIGHUP; after a short debounce it re-reads both files, and only when their
//! bytes changed does it build a new pair. A pair that cannot be used (unreadable, not PEM, a key
//! that does not match the certificate, or a half-written renewal) is logged with the reason
//! and the previous certificate stays; the next change is tried afresh.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use crate::{
    config::TlsFiles,
    metrics::Metrics,
    tls::{self, TlsError},
    watch::ChangeFeed,
};

/// How long to wait after a change before reading: renewals write the certificate and the key
/// one after the other.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The listener's current certificate and key, swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    /// Loads the configured pair; fails when it cannot be used.
    pub fn load(files: &TlsFiles) -> Result<Arc<CertStore>, TlsError> {
        let pair = load_pair(files)?;
        Ok(Arc::new(CertStore {
            files: files.clone(),
            current: ArcSwap::from_pointee(pair),
        }))
    }

    /// The certificate chain handshakes are served with now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Re-reads the files and swaps in the pair when it is usable; the old one stays otherwise.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = load_pair(&self.files)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }

    /// Starts the file watch and SIGHUP handler; both stop when `stop` is set.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<Option<Duration>>,
    ) -> anyhow::Result<()> {
        let cert = std::path::absolute(&self.files.cert)?;
        let key = std::path::absolute(&self.files.key)?;
        // Any change in the directories may be a renewal (symlink swaps name other paths);
        // the bytes comparison below makes unrelated changes free.
        let files = [cert.clone(), key.clone()];
        let mut feed = ChangeFeed::start(&files, |_| true, None, DEBOUNCE, stop.clone())?;
        let store = Arc::clone(self);
        let mut stop = stop;
        tokio::spawn(async move {
            let mut last_seen = read_both(&store.files);
            while feed.next(&mut stop).await {
                let seen = read_both(&store.files);
                if seen == last_seen {
                    continue;
                }
                last_seen = seen;
                let store = Arc::clone(&store);
                let result = tokio::task::spawn_blocking(move || store.reload()).await;
                match result {
                    Ok(Ok(())) => {
                        metrics.certificate_reload(true);
                        tracing::info!(
                            cert = %cert.display(),
                            "TLS certificate reloaded: new handshakes use it"
                        );
                    }
                    Ok(Err(err)) => {
                        metrics.certificate_reload(false);
                        tracing::error!(
                            "TLS certificate reload failed, keeping the current certificate: {err}"
                        );
                    }
                    Err(e) => {
                        metrics.certificate_reload(false);
                        tracing::error!(
                            "TLS certificate reload panicked, keeping the current certificate: {e}"
                        );
                    }
                }
            }
        });
        Ok(())
    }
}

/// The raw bytes of both files (`None` for one that cannot be read), to notice real changes.
fn read_both(files: &TlsFiles) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    (
        std::fs::read(&files.cert).ok(),
        std::fs::read(&files.key).ok(),
    )
}

/// Reads and checks a certificate chain and its key; a mismatched pair is refused.
fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    tls::install_crypto_provider();
    let certs = tls::load_certs(&files.cert)?;
    let key = tls::load_key(&files.key)?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let pair = CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
        },
        other => TlsError::Pair(other),
    })?;
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write_pair(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), key).unwrap();
        TlsFiles {
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
        }
    }

    #[test]
    fn a_mismatched_or_broken_pair_keeps_the_current_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let files = write_pair(dir.path(), &a.cert.pem(), &a.signing_key.serialize_pem());
        let store = CertStore::load(&files).unwrap();
        let served = |s: &CertStore| s.current().cert[0].to_vec();
        assert_eq!(served(&store), a.cert.der().to_vec());

        write_pair(dir.path(), &b.cert.pem(), &a.signing_key.serialize_pem());
        let err = store.reload().unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert_eq!(served(&store), a.cert.der().to_vec());

        write_pair(
            dir.path(),
            "not a certificate",
            &b.signing_key.serialize_pem(),
        );
        let err = store.reload().unwrap_err().to_string();
        assert!(err.contains("no usable PEM certificate"), "{err}");
        assert_eq!(served(&store), a.cert.der().to_vec());

        write_pair(dir.path(), &b.cert.pem(), &b.signing_key.serialize_pem());
        store.reload().unwrap();
        assert_eq!(served(&store), b.cert.der().to_vec());
    }
}
