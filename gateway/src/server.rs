//! The node and its HTTP/WebSocket server: router, listener, shutdown.
//!
//! Owns the accept loop (plain TCP or TLS, see `tls`), the upgrade to
//! WebSocket with its checks (Origin allowlist; an optional
//! `Authorization: Bearer` token verified before the upgrade), health and
//! metrics endpoints, and the ordered shutdown. Does not own what a connection does
//! (`conn`).
//!
//! Shutdown, in order: readiness goes 503; the accept loop stops; the node
//! token is cancelled; every connection sends close 1012 at a random moment
//! within the drain spread; the task tracker is awaited for at most the drain
//! timeout, and the report says whether every connection ended in time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::auth::{Identity, Verifier};
use crate::bus::{Bus, ClusterConfig, NatsBus};
use crate::config::Config;
use crate::conn;
use crate::limits::{Limits, Refusal};
use crate::metrics::{self, Metrics};
use crate::rooms::{ConnId, LogMode, RoomIndex, RoomLimits};
use crate::tcp::SharedTcp;
use crate::tls::Tls;

/// The JSON sub-protocol (the default).
pub const PROTOCOL_JSON: &str = "gw.v1.json";
/// The protobuf sub-protocol (binary frames, `proto/proto/client.proto`).
pub const PROTOCOL_PROTO: &str = "gw.v1.proto";

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading verification keys failed")]
    Keys(#[from] crate::auth::KeyError),
    #[error("cluster mode could not start")]
    Cluster(#[from] crate::bus::nats::ClusterError),
    #[error("loading the TLS certificate failed")]
    Tls(#[from] crate::tls::TlsError),
}

/// Shared state of one gateway node.
pub struct Node {
    pub cfg: Config,
    pub rooms: Arc<RoomIndex>,
    pub verifier: Verifier,
    pub bus: Bus,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Present when serving `wss://`.
    tls: Option<Arc<Tls>>,
    conn_seq: AtomicU64,
    conns: Arc<AtomicUsize>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    ready: AtomicBool,
    peak_outbox_bytes: AtomicUsize,
}

/// Decrements the connection count when a connection ends.
pub struct ConnCount(Arc<AtomicUsize>);

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    /// Builds a node: loads keys and the TLS certificate, sizes the room
    /// index and, in cluster mode, connects to NATS and checks the streams.
    /// Binds nothing.
    pub async fn new(cfg: Config) -> Result<Arc<Self>, StartError> {
        let verifier = crate::config::verifier(&cfg)?;
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(Tls::load(cert, key)?)),
            _ => None,
        };
        let mode = if cfg.nats.is_empty() {
            LogMode::Authoritative
        } else {
            LogMode::Cache
        };
        let rooms = Arc::new(RoomIndex::new(
            RoomLimits {
                fanout_shards: cfg.fanout_shards,
                history_size: cfg.history_size,
                history_max_bytes: cfg.history_max_bytes,
                dedup_window: cfg.dedup_window,
                dedup_max_keys: cfg.dedup_max_keys,
                max_rooms: cfg.max_rooms,
                max_pending: 10_000,
            },
            mode,
        ));
        let metrics = Metrics::new();
        let bus = if cfg.nats.is_empty() {
            Bus::Embedded
        } else {
            let cluster = ClusterConfig {
                urls: cfg.nats.clone(),
                name: cfg.node_id.clone(),
                prefix: cfg.nats_prefix.clone(),
                partitions: cfg.nats_partitions,
                replicas: cfg.nats_replicas,
                history: cfg.history_size as i64,
                max_age: cfg.room_max_age,
                dedup_window: cfg.dedup_window,
                ephemeral_prefixes: cfg.ephemeral_prefixes.clone(),
                linger: cfg.room_linger,
                publish_timeout: cfg.publish_timeout,
                connect_timeout: cfg.nats_connect_timeout,
                ignore_discovered: cfg.nats_ignore_discovered,
            };
            Bus::Nats(NatsBus::start(cluster, rooms.clone(), metrics.deliveries_total.clone()).await?)
        };
        let limits = Limits::new(&cfg.limits, !cfg.no_rate_limits);
        // The flushers live as long as the runtime; they hold no node state.
        for flusher in rooms.flushers().shards() {
            let flusher = flusher.clone();
            tokio::spawn(async move { flusher.run().await });
        }
        Ok(Arc::new(Self {
            cfg,
            rooms,
            verifier,
            bus,
            metrics,
            limits,
            tls,
            conn_seq: AtomicU64::new(1),
            conns: Arc::new(AtomicUsize::new(0)),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            ready: AtomicBool::new(true),
            peak_outbox_bytes: AtomicUsize::new(0),
        }))
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        ConnId(self.conn_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Counts a connection until the returned guard drops.
    pub(crate) fn count_conn(&self) -> ConnCount {
        self.conns.fetch_add(1, Ordering::Relaxed);
        self.metrics.conns_total.increment(1);
        ConnCount(self.conns.clone())
    }

    /// WebSocket connections open right now.
    pub fn conns_active(&self) -> usize {
        self.conns.load(Ordering::Relaxed)
    }

    /// Whether the node accepts new traffic: not draining, and (cluster
    /// mode) connected to NATS.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.bus.is_connected()
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        !self.ready.load(Ordering::Relaxed)
    }

    /// Resolves when the node starts draining.
    pub async fn draining(&self) {
        self.shutdown.cancelled().await;
    }

    pub(crate) fn record_outbox_peak(&self, bytes: usize) {
        self.peak_outbox_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    /// Whether the node serves `wss://`.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reloads the TLS certificate now if its files changed (e.g. on SIGHUP).
    pub fn reload_tls(&self) {
        if let Some(tls) = &self.tls {
            crate::tls::reload_logged(tls);
        }
    }

    /// Highest number of bytes queued for any one closed connection.
    pub fn peak_outbox_bytes(&self) -> usize {
        self.peak_outbox_bytes.load(Ordering::Relaxed)
    }
}

/// What a shutdown achieved.
#[derive(Debug, Clone, Copy)]
pub struct DrainReport {
    /// Connections open when the drain began.
    pub conns_at_start: usize,
    /// Whether every task ended within the drain timeout.
    pub clean: bool,
    pub elapsed: Duration,
}

/// Serves the node on `listener` until `shutdown` resolves, then drains.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> DrainReport {
    let router = router(node.clone());
    node.verifier.start(node.shutdown.clone());
    if let Some(tls) = &node.tls {
        tokio::spawn(crate::tls::watch(
            tls.clone(),
            node.cfg.tls_reload,
            node.shutdown.clone(),
        ));
    }
    let accept = accept_loop(node.clone(), listener, router);
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
        () = node.limits.sweep_forever() => {}
    }
    drain(&node).await
}

async fn drain(node: &Node) -> DrainReport {
    let started = Instant::now();
    node.ready.store(false, Ordering::Relaxed);
    let conns_at_start = node.conns_active();
    tracing::info!(conns = conns_at_start, timeout = ?node.cfg.drain_timeout, "draining");
    node.shutdown.cancel();
    node.tracker.close();
    let clean = tokio::time::timeout(node.cfg.drain_timeout, node.tracker.wait())
        .await
        .is_ok();
    let report = DrainReport {
        conns_at_start,
        clean,
        elapsed: started.elapsed(),
    };
    if clean {
        tracing::info!(elapsed = ?report.elapsed, "drain complete");
    } else {
        tracing::warn!(
            left = node.conns_active(),
            "drain timed out with connections still open"
        );
    }
    report
}

async fn accept_loop(node: Arc<Node>, listener: TcpListener, router: Router) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let token = node.shutdown.clone();
        // One shared config whose resolver hands out the current certificate
        // per handshake: a reload reaches the next handshake, established
        // sessions keep theirs.
        let tls = node.tls.as_ref().map(|t| t.acceptor().clone());
        node.tracker.spawn(async move {
            match tls {
                None => serve_http(tcp, peer, router, token).await,
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_http(stream, peer, router, token).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
}

/// Binds with a deep accept queue: during a reconnect storm a short queue
/// (tokio's default is 1,024) makes the kernel drop SYNs, and clients then
/// wait for their 1 s / 3 s retransmits instead of for the gateway.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accept queue length (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: u32 = 8192;

/// Longest a TLS handshake may take before the socket is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers): a 1 MiB `Authorization`
/// header is refused by the HTTP layer (431) before anything parses it.
const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// Serves HTTP/1.1 (and upgrades) on one accepted connection, plain or TLS.
async fn serve_http<I>(io: I, peer: SocketAddr, router: Router, token: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer);
        let mut router = router.clone();
        async move { router.call(req.map(Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        }
        () = token.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// The HTTP routes of a node.
pub fn router(node: Arc<Node>) -> Router {
    let mut r = Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if node.cfg.metrics_listen.is_none() {
        r = r.route("/metrics", get(metrics_text));
    }
    r.with_state(node)
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    }
}

async fn metrics_text(State(node): State<Arc<Node>>) -> Response {
    let m = &node.metrics;
    m.conns_active.set(node.conns_active() as f64);
    m.rooms_active.set(node.rooms.len() as f64);
    // The flushers count in their own atomics (no metric call per write).
    let flushed = node.rooms.flushers().stats();
    m.flusher_writes_total.absolute(flushed.writes);
    m.flusher_frames_total.absolute(flushed.frames);
    m.flusher_handoffs_total.absolute(flushed.handoffs);
    let mut text = metrics::prometheus().render();
    if node.cfg.room_metrics_top > 0 {
        // Room names are user data (`dm:alice:bob`): only operator-listed
        // patterns are shown by name, everything else is summed in `_other`.
        let patterns = &node.cfg.room_metrics_rooms;
        let shown = |room: &str| room != metrics::OTHER_ROOMS && patterns.iter().any(|p| p.matches(room));
        let rooms = node.rooms.top_rooms(node.cfg.room_metrics_top, shown);
        metrics::render_rooms(&mut text, &rooms);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Serves `/metrics` alone (for `--metrics-listen`).
pub async fn serve_metrics(node: Arc<Node>, listener: TcpListener) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(node.clone());
    let token = node.shutdown.clone();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
}

fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

/// A refusal before the upgrade: 503 or 429 with `Retry-After`; the
/// connection is closed so a storm does not hold sockets open.
fn refuse_admission(refusal: Refusal) -> Response {
    let mut r = refuse(refusal.status(), refusal.text());
    let h = r.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(refusal.retry_after_secs()));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the Origin header against the allowlist.
fn origin_allowed(cfg: &Config, headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => cfg.allow_no_origin,
        Some(origin) => {
            cfg.allowed_origins.is_empty() || cfg.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
        }
    }
}

/// The token of an `Authorization: Bearer` header: `None` without the
/// header, `Err` when the header is not a bearer token.
fn bearer(headers: &HeaderMap) -> Option<Result<String, ()>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let text = value.to_str().map_err(|_| ());
    Some(text.and_then(|t| {
        let (scheme, token) = t.trim().split_once(' ').ok_or(())?;
        let token = token.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
            Ok(token.to_string())
        } else {
            Err(())
        }
    }))
}

/// Verifies an `Authorization: Bearer` token before the upgrade; a refusal
/// is HTTP 401 (counted by reason, the token never echoed).
async fn authorize_upgrade(node: &Node, headers: &HeaderMap) -> Result<Option<Identity>, Response> {
    let token = match bearer(headers) {
        None => return Ok(None),
        Some(Ok(t)) => t,
        Some(Err(())) => {
            node.metrics.auth_failed("malformed");
            return Err(unauthorized("Authorization must be Bearer <JWT>".to_string()));
        }
    };
    match node.verifier.verify_connect(&token).await {
        Ok(identity) => Ok(Some(identity)),
        Err(e) => {
            node.metrics.auth_failed(e.label());
            Err(unauthorized(e.to_string()))
        }
    }
}

/// HTTP 401 with a fixed message (an [`crate::auth::AuthError`] text, never the token).
fn unauthorized(why: String) -> Response {
    let mut r = (StatusCode::UNAUTHORIZED, why).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    r
}

/// Picks the sub-protocol: the first one the client offered that this node
/// speaks; `Ok(None)` when the client offered none (JSON is the default),
/// `Err` when it offered only ones this node does not speak.
fn pick_protocol(headers: &HeaderMap) -> Result<Option<&'static str>, ()> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|p| [PROTOCOL_JSON, PROTOCOL_PROTO].into_iter().find(|ours| ours == p))
        .map(Some)
        .ok_or(())
}

async fn ws_upgrade(State(node): State<Arc<Node>>, mut req: Request) -> Response {
    if node.is_draining() {
        let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "node draining");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let headers = req.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return refuse(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        let mut r = refuse(StatusCode::BAD_REQUEST, "unsupported WebSocket version");
        r.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    if !origin_allowed(&node.cfg, headers) {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let Ok(protocol) = pick_protocol(headers) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "no supported sub-protocol (gw.v1.json, gw.v1.proto)",
        );
    };
    let peer = req
        .extensions()
        .get::<SocketAddr>()
        .copied()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let admit = match node.limits.admit(headers, peer) {
        Ok(a) => a,
        Err(refusal) => return refuse_admission(refusal),
    };
    // After admission: verifying a bearer token costs CPU a storm must not get.
    let key = key.clone();
    let identity = match authorize_upgrade(&node, req.headers()).await {
        Ok(i) => i,
        Err(refused) => return refused,
    };
    let accept = derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };
    let max_frame = node.cfg.max_frame_bytes;
    let proto = protocol == Some(PROTOCOL_PROTO);
    let task_node = node.clone();
    node.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let upgrade = conn::Upgrade {
                    peer,
                    admit,
                    identity,
                    proto,
                };
                start_conn(task_node, upgraded, max_frame, upgrade);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "upgrade failed"),
        }
    });
    let mut builder = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    builder
        .body(Body::empty())
        .unwrap_or_else(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "response"))
}

/// Starts the connection's task on the socket under the upgraded HTTP
/// connection. hyper's boxed I/O is taken apart again so the connection holds
/// the bare socket (plain TCP: shared, without a lock, by the connection's
/// task and the flusher that writes its room messages), and the connection
/// gets a task of its own: its future is the whole per-connection state,
/// nothing of the upgrade stays in it. TLS connections are written by their
/// task only.
fn start_conn(node: Arc<Node>, upgraded: hyper::upgrade::Upgraded, max_frame: usize, upgrade: conn::Upgrade) {
    let tracker = node.tracker.clone();
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let tcp = SharedTcp::new(parts.io.into_inner());
            let reader = crate::ws::Reader::new(tcp.clone(), max_frame, &parts.read_buf);
            let sink = tcp.sink();
            tracker.spawn(conn::run(node, reader, tcp, Some(sink), upgrade));
            return;
        }
        Err(u) => u,
    };
    type TlsIo = tokio_rustls::server::TlsStream<TcpStream>;
    match upgraded.downcast::<TokioIo<TlsIo>>() {
        Ok(parts) => {
            let (r, w) = tokio::io::split(parts.io.into_inner());
            let reader = crate::ws::Reader::new(r, max_frame, &parts.read_buf);
            tracker.spawn(conn::run(node, reader, w, None, upgrade));
        }
        Err(upgraded) => {
            let (r, w) = tokio::io::split(TokioIo::new(upgraded));
            let reader = crate::ws::Reader::new(r, max_frame, &[]);
            tracker.spawn(conn::run(node, reader, w, None, upgrade));
        }
    }
}
