//! Certificate hot reload: the listener's certificate, and the one keygate shows an upstream
//! (`[upstream] client_cert`), each live behind one `ArcSwap`.
//!
//! [`CertStore`] is the rustls [`ResolvesServerCert`] of the listener and the
//! [`ResolvesClientCert`] of the upstream hop: each handshake takes the current pair with one
//! `load`, so a swap reaches the next handshake while open connections (and pooled upstream
//! ones) go on with the certificate they were made with. The watcher observes the directories
//! of the certificate and key files (renewal tools replace files by rename or by swapping a
//! symlink) and also acts on SIGHUP; after a short debounce it re-reads both files, and only
//! when their bytes changed does it build a new pair. A pair that cannot be used (unreadable,
//! not PEM, a key that does not match the certificate, or a half-written renewal) is logged
//! with the reason and the previous certificate stays; the next change is tried afresh.
//! [`ClientSessions`] keeps upstream TLS sessions from outliving the certificate they were
//! made with.
//!
//! Expiry: each certificate's end of validity (its leaf's `notAfter`) is exported as
//! `keygate_certificate_expiry_timestamp_seconds`, for alerting, as cert-manager and the
//! blackbox exporter do; at start, after each reload and once a day a certificate with fewer
//! than [`EXPIRY_WARNING`] left is logged as a warning, an expired one as an error. keygate still
//! serves an expired certificate (as nginx and Envoy do): replacing it is a file write away,
//! and refusing to start would turn a warning into an outage. `keygate check` prints the dates
//! and fails on exactly what would stop a start ([`ConfiguredCerts::load`]).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use rustls::{
    client::{
        ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Tls12ClientSessionValue,
        Tls13ClientSessionValue,
    },
    pki_types::ServerName,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    NamedGroup, SignatureScheme,
};
use tokio::sync::watch;

use crate::{
    config::{Config, TlsFiles},
    metrics::Metrics,
    tls::{self, TlsError},
    watch::{ChangeFeed, FilesRead},
};

/// How long to wait after a change before reading: renewals write the certificate and the key
/// one after the other.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// A certificate closer than this to its end of validity is logged as a warning at start and
/// on each reload (Let's Encrypt certificates are renewed 30 days ahead; this is for the
/// renewal that did not happen).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// How often a running gateway looks at its certificates' expiry again (and logs as above).
const EXPIRY_RECHECK: Duration = Duration::from_secs(24 * 3600);

/// A current certificate and key, swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    /// What the certificate is for, as the log lines name it.
    role: CertRole,
    /// The files as they were just before the first load.
    read: FilesRead,
}

/// Which side of keygate a [`CertStore`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    /// `[server] tls_cert` / `tls_key`: shown to partners.
    Listener,
    /// `[upstream] client_cert` / `client_key`: shown to an upstream that asks for one.
    UpstreamClient,
}

impl CertRole {
    /// The certificate's name in log lines and start-up errors.
    pub fn name(self) -> &'static str {
        match self {
            CertRole::Listener => "TLS certificate",
            CertRole::UpstreamClient => "upstream client certificate",
        }
    }

    /// The `certificate` label of its metrics.
    pub fn label(self) -> &'static str {
        match self {
            CertRole::Listener => "listener",
            CertRole::UpstreamClient => "upstream_client",
        }
    }
}

/// The certificate pairs a config names, read as a start reads them: `keygate run` and
/// `keygate check` refuse the same files with the same message.
#[derive(Debug)]
pub struct ConfiguredCerts {
    /// `[server] tls_cert` / `tls_key`.
    pub listener: Option<Arc<CertStore>>,
    /// `[upstream] client_cert` / `client_key`.
    pub upstream_client: Option<Arc<CertStore>>,
}

impl ConfiguredCerts {
    /// Loads both pairs when configured; fails on the first one that cannot be used.
    pub fn load(config: &Config) -> anyhow::Result<ConfiguredCerts> {
        let listener = match &config.server.tls {
            Some(files) => Some(CertStore::load(files, CertRole::Listener)?),
            None => None,
        };
        let upstream_client = match &config.upstream.client_cert {
            Some(files) => Some(
                CertStore::load(files, CertRole::UpstreamClient)
                    .map_err(|e| anyhow::anyhow!("[upstream] client_cert: {e}"))?,
            ),
            None => None,
        };
        Ok(ConfiguredCerts {
            listener,
            upstream_client,
        })
    }

    /// The loaded stores.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<CertStore>> {
        self.listener.iter().chain(&self.upstream_client)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for CertStore {
    /// The current pair whatever the upstream hints: it has one certificate to show.
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl CertStore {
    /// Loads the configured pair; fails when it cannot be used.
    pub fn load(files: &TlsFiles, role: CertRole) -> Result<Arc<CertStore>, TlsError> {
        let read = stamped(files);
        let pair = load_pair(files)?;
        Ok(Arc::new(CertStore {
            files: files.clone(),
            current: ArcSwap::from_pointee(pair),
            role,
            read,
        }))
    }

    /// The certificate chain handshakes are served with now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// When the current certificate stops being valid (its leaf's `notAfter`); `None` when its
    /// validity cannot be read (rustls, which serves it, does not need it).
    pub fn expires(&self) -> Option<SystemTime> {
        not_after(self.current.load().cert.first()?)
    }

    /// Exports the current certificate's expiry and logs it when it is near or past.
    fn report_expiry(&self, metrics: &Metrics) {
        let expires = self.expires();
        metrics.certificate_expiry(self.role.label(), expires);
        let Some(at) = expires else { return };
        let what = self.role.name();
        let cert = self.files.cert.display();
        let validity = Validity::at(at, SystemTime::now());
        match validity {
            Validity::Expired { .. } => tracing::error!(
                "{what} {cert} {validity}: partners' clients refuse it; replace the file"
            ),
            Validity::Valid { left, .. } if left < EXPIRY_WARNING => {
                tracing::warn!("{what} {cert} {validity}: renew it")
            }
            Validity::Valid { .. } => {}
        }
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
        let files = [cert.clone(), key.clone()];
        let mut feed = ChangeFeed::start(&files, None, DEBOUNCE, stop.clone())?;
        let store = Arc::clone(self);
        let what = self.role.name();
        self.report_expiry(&metrics);
        // And once a day: a renewal that never came leaves no event to log it by.
        let daily = Arc::clone(self);
        let (daily_metrics, mut daily_stop) = (Arc::clone(&metrics), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(EXPIRY_RECHECK) => daily.report_expiry(&daily_metrics),
                    _ = daily_stop.wait_for(Option::is_some) => break,
                }
            }
        });
        let mut stop = stop;
        tokio::spawn(async move {
            // Stamped before the first load: a renewal between that load and the watch counts.
            let mut seen = store.read.clone();
            while let Some(now) = feed.changed_since(&seen, &mut stop).await {
                seen = now;
                let reloading = Arc::clone(&store);
                let result = tokio::task::spawn_blocking(move || reloading.reload()).await;
                match result {
                    Ok(Ok(())) => {
                        metrics.certificate_reload(true);
                        tracing::info!(
                            cert = %cert.display(),
                            "{what} reloaded: new handshakes use it"
                        );
                        store.report_expiry(&metrics);
                    }
                    Ok(Err(err)) => {
                        metrics.certificate_reload(false);
                        tracing::error!(
                            "{what} reload failed, keeping the current certificate: {err}"
                        );
                    }
                    Err(e) => {
                        metrics.certificate_reload(false);
                        tracing::error!(
                            "{what} reload panicked, keeping the current certificate: {e}"
                        );
                    }
                }
            }
        });
        Ok(())
    }
}

/// Upstream TLS sessions kept at once (rustls's default for its in-memory cache).
const UPSTREAM_SESSIONS: usize = 256;

/// The upstream hop's TLS session cache when keygate shows a client certificate: sessions
/// (TLS 1.3 tickets, TLS 1.2 ids) are resumed only while the certificate they were made with is
/// the current one. A resumed session carries the client identity of its first handshake, so
/// without this a renewed certificate would reach the upstream only as old tickets ran out.
/// (A handshake that straddles a renewal may still file its ticket under the new certificate.)
#[derive(Debug)]
pub struct ClientSessions {
    certs: Arc<CertStore>,
    /// The certificate the cached sessions were made with, and the cache.
    cache: Mutex<(Arc<CertifiedKey>, Arc<ClientSessionMemoryCache>)>,
}

impl ClientSessions {
    /// An empty cache for sessions made with `certs`' current certificate.
    pub fn new(certs: Arc<CertStore>) -> ClientSessions {
        let current = certs.current();
        ClientSessions {
            certs,
            cache: Mutex::new((
                current,
                Arc::new(ClientSessionMemoryCache::new(UPSTREAM_SESSIONS)),
            )),
        }
    }

    /// The current certificate's sessions: a fresh cache once the certificate was renewed.
    fn sessions(&self) -> Arc<ClientSessionMemoryCache> {
        let current = self.certs.current.load();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&cache.0, &current) {
            *cache = (
                Arc::clone(&current),
                Arc::new(ClientSessionMemoryCache::new(UPSTREAM_SESSIONS)),
            );
        }
        Arc::clone(&cache.1)
    }
}

impl ClientSessionStore for ClientSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.sessions().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.sessions().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.sessions().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.sessions().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.sessions().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.sessions().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.sessions().take_tls13_ticket(server_name)
    }
}

/// Where a certificate stands against its `notAfter`; displayed as `keygate check` and the
/// log show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Still valid, for `left`.
    Valid {
        /// Time left.
        left: Duration,
        /// The `notAfter`.
        until: SystemTime,
    },
    /// Past its `notAfter` by `ago`.
    Expired {
        /// Time since.
        ago: Duration,
        /// The `notAfter`.
        since: SystemTime,
    },
}

impl Validity {
    /// A certificate valid until `not_after`, seen at `now`.
    pub fn at(not_after: SystemTime, now: SystemTime) -> Validity {
        match not_after.duration_since(now) {
            Ok(left) => Validity::Valid {
                left,
                until: not_after,
            },
            Err(e) => Validity::Expired {
                ago: e.duration(),
                since: not_after,
            },
        }
    }
}

impl std::fmt::Display for Validity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const DAY: u64 = 24 * 3600;
        match *self {
            Validity::Valid { left, until } => write!(
                f,
                "valid until {} ({} days left)",
                humantime::format_rfc3339_seconds(until),
                left.as_secs() / DAY
            ),
            Validity::Expired { ago, since } => write!(
                f,
                "EXPIRED on {} ({} days ago)",
                humantime::format_rfc3339_seconds(since),
                ago.as_secs() / DAY
            ),
        }
    }
}

/// The `notAfter` of a DER certificate, when it parses (a date before 1970 reads as 1970).
fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// The pair's files stamped, about to be read.
fn stamped(files: &TlsFiles) -> FilesRead {
    let mut read = FilesRead::default();
    read.stamp(&files.cert);
    read.stamp(&files.key);
    read
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

    /// A certificate near its end is logged at start and again each day while keygate runs.
    #[tokio::test(start_paused = true)]
    async fn expiry_is_logged_at_start_and_once_a_day() {
        let lines = crate::telemetry::capture::LogSink::default();
        let _log = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(lines.clone())
                .finish(),
        );
        let warnings = || lines.text().matches("(5 days left): renew it").count();

        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(5 * 24 + 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), &cert.pem(), &key.serialize_pem());
        let store = CertStore::load(&files, CertRole::Listener).unwrap();
        let (stop_tx, stop) = watch::channel(None);
        store.spawn_watcher(Arc::new(Metrics::new()), stop).unwrap();
        assert_eq!(warnings(), 1);
        // Paused time jumps to each timer: the daily check, not the renewal watch, fires.
        tokio::time::sleep(EXPIRY_RECHECK / 2).await;
        assert_eq!(warnings(), 1);
        tokio::time::sleep(EXPIRY_RECHECK).await;
        assert_eq!(warnings(), 2);
        tokio::time::sleep(EXPIRY_RECHECK).await;
        assert_eq!(warnings(), 3);
        stop_tx.send(Some(Duration::ZERO)).unwrap();
    }

    /// A renewal written after the pair was loaded but before its watch started has no event
    /// of its own: the watch finds it at once and serves it.
    #[tokio::test]
    async fn a_renewal_before_the_watch_started_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let files = write_pair(dir.path(), &a.cert.pem(), &a.signing_key.serialize_pem());
        let store = CertStore::load(&files, CertRole::Listener).unwrap();
        write_pair(dir.path(), &b.cert.pem(), &b.signing_key.serialize_pem());
        let (stop_tx, stop) = watch::channel(None);
        store.spawn_watcher(Arc::new(Metrics::new()), stop).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.current().cert[0].as_ref() != b.cert.der().as_ref() {
            assert!(
                std::time::Instant::now() < deadline,
                "the renewal was not picked up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(Some(Duration::ZERO)).unwrap();
    }

    #[test]
    fn a_mismatched_or_broken_pair_keeps_the_current_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let files = write_pair(dir.path(), &a.cert.pem(), &a.signing_key.serialize_pem());
        let store = CertStore::load(&files, CertRole::Listener).unwrap();
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
