//! TLS termination (`wss://`) with a certificate that can change under a
//! running node.
//!
//! Owns loading the PEM certificate chain and key and the rustls server
//! configuration; the accept loop (`server`) only runs handshakes. The
//! configuration resolves the certificate per handshake from a [`CertStore`],
//! so a renewed certificate (cert-manager, certbot) is served to new
//! connections as soon as it is loaded, while established connections keep
//! the session they negotiated: nothing is restarted or dropped.
//!
//! Invariants: a certificate and key that fail to load or do not match never
//! replace the ones in use; the store always holds a usable pair.
//!
//! Concurrency: the current pair is an `Arc` behind a lock held only to
//! clone or replace it. [`watch`] polls the files (contents, not mtimes, so
//! a copy that keeps the mtime is still seen); `SIGHUP` can force a reload
//! through [`Tls::reload`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: String },
    #[error("{path} is not a PEM certificate chain")]
    CertPem {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} is not a PEM private key")]
    KeyPem {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the key does not fit the certificate")]
    Key(#[source] rustls::Error),
    #[error("building the TLS configuration failed")]
    Config(#[source] rustls::Error),
}

/// The crypto provider of every TLS endpoint of the node (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide rustls provider, for code that asks rustls
/// for the default (with both ring and aws-lc-rs compiled in, rustls panics
/// instead of choosing). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificate and key served now, and where they come from.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// File contents last looked at, loaded or not.
    seen: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certified(
    cert_path: &Path,
    cert: &[u8],
    key_path: &Path,
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::CertPem {
            path: cert_path.display().to_string(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert_path.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::KeyPem {
        path: key_path.display().to_string(),
        source,
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Key)
}

/// The node's TLS endpoint: an acceptor whose certificate can be reloaded.
pub struct Tls {
    acceptor: TlsAcceptor,
    store: Arc<CertStore>,
}

impl Tls {
    /// Loads `cert` (PEM chain) and `key` (PEM, PKCS#8, PKCS#1 or SEC1).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let provider = provider();
        let (c, k) = (read(cert)?, read(key)?);
        let pair = certified(cert, &c, key, &k, &provider)?;
        let store = Arc::new(CertStore {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            provider: provider.clone(),
            current: RwLock::new(Arc::new(pair)),
            seen: Mutex::new((c, k)),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            store,
        })
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reloads the files if their contents changed. `Ok(true)` when a new
    /// pair is now served; on error the previous pair stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let s = &self.store;
        let (c, k) = (read(&s.cert_path)?, read(&s.key_path)?);
        {
            let mut seen = s.seen.lock();
            if seen.0 == c && seen.1 == k {
                return Ok(false);
            }
            // Remember even a pair that fails: a half-written renewal is
            // retried when the files change again, not logged every poll.
            *seen = (c.clone(), k.clone());
        }
        let pair = certified(&s.cert_path, &c, &s.key_path, &k, &s.provider)?;
        *s.current.write() = Arc::new(pair);
        Ok(true)
    }
}

/// Polls the certificate files every `every` until `stop`, reloading on change.
pub async fn watch(tls: Arc<Tls>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        reload_logged(&tls);
    }
}

/// [`Tls::reload`], logged and counted.
pub fn reload_logged(tls: &Tls) {
    match tls.reload() {
        Ok(true) => {
            crate::metrics::tls_reloaded("ok");
            tracing::info!(cert = %tls.store.cert_path.display(), "TLS certificate reloaded");
        }
        Ok(false) => {}
        Err(e) => {
            crate::metrics::tls_reloaded("error");
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "TLS certificate reload failed; keeping the current one");
        }
    }
}
