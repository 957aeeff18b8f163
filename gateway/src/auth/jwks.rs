//! JWKS URLs: key sets fetched over HTTP(S), e.g. a Keycloak realm's
//! `/protocol/openid-connect/certs`.
//!
//! Owns fetching and holding one URL's keys (moved here from `src/jwks.rs`).
//! Does not own what a key may verify (decided in `auth`) nor what a key is
//! or how a JWKS document is read (`auth::keys`, the leaf both build on; this
//! module never uses `auth` itself).
//!
//! A source is fetched when the node starts, again on its refresh interval,
//! and when a token names a `kid` the source does not hold (key rotation is
//! then picked up on first use of the new key).
//!
//! Invariants: at most one fetch per source is in flight (single-flight); a
//! fetch for an unknown `kid` starts at most once per `refetch_min` (once a
//! second before the first fetch succeeded), so a flood of junk `kid`s costs
//! the identity provider one request, not one per token; a failed or empty
//! fetch keeps the previous keys.
//!
//! Concurrency: the key set is an `Arc<Vec<_>>` swapped whole under a lock
//! held only to clone or replace it. Fetches run in their own task holding the
//! single-flight lock, so a waiter that gives up (or a client that goes away)
//! never cancels a fetch half-way; waiters give up after `wait`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::{Mutex, RwLock};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::auth::keys::{KeyError, VerifyKey, parse_jwks};

/// How a JWKS URL is fetched.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Interval of routine refetches. Default 300 s.
    pub refresh: Duration,
    /// Least time between two refetches for unknown `kid`s. Default 10 s.
    pub refetch_min: Duration,
    /// Longest a verification waits for an in-flight fetch. Default 2 s.
    pub wait: Duration,
    /// Longest one fetch may take. Default 5 s.
    pub fetch_timeout: Duration,
    /// Largest JWKS document accepted. Default 1 MiB.
    pub max_bytes: usize,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(300),
            refetch_min: Duration::from_secs(10),
            wait: Duration::from_secs(2),
            fetch_timeout: Duration::from_secs(5),
            max_bytes: 1 << 20,
        }
    }
}

/// Why one fetch failed. The URL is logged; the body never is.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request timed out")]
    Timeout,
    #[error("request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("reading the body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the body is not a JWKS document")]
    Parse(#[source] serde_json::Error),
    #[error("the JWKS holds no usable signing key")]
    NoUsableKey,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// One JWKS URL and the keys last fetched from it.
pub struct JwksSource {
    url: hyper::Uri,
    issuer: Option<Arc<str>>,
    opts: SourceOptions,
    client: HttpClient,
    keys: RwLock<Arc<Vec<VerifyKey>>>,
    loaded: AtomicBool,
    /// Held by the one fetch in flight.
    fetch_lock: Arc<tokio::sync::Mutex<()>>,
    /// Fetches finished (successful or not).
    attempts: AtomicU64,
    /// When the last fetch for an unknown `kid` started, once loaded.
    last_refetch: Mutex<Option<Instant>>,
    /// The same before the first successful fetch, limited separately so that
    /// a connect racing the start-up fetch does not use up the budget that
    /// the first key rotation needs.
    last_unloaded: Mutex<Option<Instant>>,
    /// The fetches, each in its own task so that a cancelled caller never
    /// cuts one in half; the node closes and awaits it at shutdown
    /// ([`JwksSource::tasks`]).
    tasks: tokio_util::task::TaskTracker,
}

/// Least time between unknown-`kid` fetches while no fetch has succeeded yet.
const UNLOADED_REFETCH_MIN: Duration = Duration::from_secs(1);

impl JwksSource {
    /// A source for `url` (`http://` or `https://`); fetches nothing yet.
    pub fn new(url: &str, issuer: Option<Arc<str>>, opts: SourceOptions) -> Result<Self, KeyError> {
        let bad = || KeyError::Url { url: url.to_string() };
        let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(bad());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Native roots cover an IdP behind a corporate CA installed in the
        // image; Mozilla's roots are the fallback when the system has none.
        let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone())
        {
            Ok(b) => b,
            Err(_) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(provider)
                .map_err(|e| KeyError::HttpClient(std::io::Error::other(e)))?,
        };
        let connector = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            url: uri,
            issuer,
            opts,
            client,
            keys: RwLock::new(Arc::new(Vec::new())),
            loaded: AtomicBool::new(false),
            fetch_lock: Arc::new(tokio::sync::Mutex::new(())),
            attempts: AtomicU64::new(0),
            last_refetch: Mutex::new(None),
            last_unloaded: Mutex::new(None),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// The issuer this source's keys are bound to, if any.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// The keys held now.
    pub fn keys(&self) -> Arc<Vec<VerifyKey>> {
        self.keys.read().clone()
    }

    /// Whether a fetch has ever succeeded.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Fetches finished so far, successful or not.
    pub fn fetches(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// Fetches now, then every `refresh` (sooner after a failure) until `stop`.
    pub async fn refresh_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let ok = self.fetch_now().await;
            let next = if ok {
                self.opts.refresh
            } else {
                self.opts.refetch_min.min(self.opts.refresh)
            };
            tokio::select! {
                () = sleep(next) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// The fetches this source runs: close and await it to end them all.
    pub fn tasks(&self) -> &tokio_util::task::TaskTracker {
        &self.tasks
    }

    /// Fetches now, after any fetch in flight, regardless of the unknown-kid
    /// rate limit (start-up, routine refresh, operators). True on success.
    pub async fn fetch_now(self: &Arc<Self>) -> bool {
        let guard = self.fetch_lock.clone().lock_owned().await;
        let me = self.clone();
        // In its own task so that a cancelled caller never cuts a fetch in half.
        self.tasks
            .spawn(async move { me.fetch_held(guard, "refresh").await })
            .await
            .unwrap_or(false)
    }

    /// Refetches for a token whose `kid` is not held: joins the fetch in
    /// flight, or starts one unless one started within `refetch_min`. Waits
    /// at most `wait`.
    pub async fn refetch(self: &Arc<Self>) {
        let seen = self.attempts.load(Ordering::Acquire);
        let work = async {
            let guard = self.fetch_lock.clone().lock_owned().await;
            if self.attempts.load(Ordering::Acquire) != seen {
                // A fetch finished while we queued: its keys are the newest.
                return;
            }
            {
                let (slot, min) = if self.loaded() {
                    (&self.last_refetch, self.opts.refetch_min)
                } else {
                    (&self.last_unloaded, UNLOADED_REFETCH_MIN.min(self.opts.refetch_min))
                };
                let mut last = slot.lock();
                if last.is_some_and(|t| t.elapsed() < min) {
                    crate::metrics::jwks_refetch_limited();
                    return;
                }
                *last = Some(Instant::now());
            }
            let me = self.clone();
            let _ = self
                .tasks
                .spawn(async move { me.fetch_held(guard, "unknown_kid").await })
                .await;
        };
        let _ = timeout(self.opts.wait, work).await;
    }

    /// One fetch, with the single-flight lock held by the caller.
    async fn fetch_held(&self, _guard: tokio::sync::OwnedMutexGuard<()>, trigger: &'static str) -> bool {
        let result = self.fetch().await;
        self.attempts.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(n) => {
                crate::metrics::jwks_fetched(trigger, "ok");
                tracing::debug!(url = %self.url, keys = n, trigger, "JWKS fetched");
                true
            }
            Err(e) => {
                crate::metrics::jwks_fetched(trigger, "error");
                tracing::warn!(url = %self.url, error = %e, source = ?std::error::Error::source(&e), trigger, "JWKS fetch failed; keeping the previous keys");
                false
            }
        }
    }

    async fn fetch(&self) -> Result<usize, FetchError> {
        let req = hyper::Request::get(self.url.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| FetchError::Body(Box::new(e)))?;
        let work = async {
            let resp = self.client.request(req).await.map_err(FetchError::Request)?;
            if !resp.status().is_success() {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            let body = Limited::new(resp.into_body(), self.opts.max_bytes)
                .collect()
                .await
                .map_err(FetchError::Body)?
                .to_bytes();
            Ok(body)
        };
        let body = timeout(self.opts.fetch_timeout, work)
            .await
            .map_err(|_| FetchError::Timeout)??;
        let keys = parse_jwks(&body, self.issuer.as_ref()).map_err(FetchError::Parse)?;
        if keys.is_empty() {
            return Err(FetchError::NoUsableKey);
        }
        let n = keys.len();
        *self.keys.write() = Arc::new(keys);
        self.loaded.store(true, Ordering::Release);
        Ok(n)
    }
}
