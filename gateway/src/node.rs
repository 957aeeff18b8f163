//! The node: every service one gateway process runs (room index, broker,
//! verifier, limits, metrics) and the task tracker and token its shutdown
//! waits on. Built from a [`Config`] before anything is bound.
//!
//! Owns the services and their lifetimes. Does not own HTTP or sockets
//! (`http`) nor what a connection does (`conn`).
//!
//! Tasks: every task the node starts runs on one of two trackers.
//! - `tracker`: connections and the work of requests; they end when the
//!   node token (`shutdown`) is cancelled.
//! - `services`: the background tasks that serve those connections (the
//!   flushers, the broker's tasks, the linger pool, the JWKS refresher, the
//!   TLS watcher, the rate-limit sweep); they end when `services_stop` is
//!   cancelled, which happens only once the connections ended, so a draining
//!   connection still gets its room's messages written.
//!
//! Shutdown, in order (`drain`): readiness goes 503; the node token is
//! cancelled (the listener stops accepting; every connection sends close
//! 1012 within the drain spread); the connection tracker is awaited until
//! the drain deadline; then the services are stopped (the broker leaves its
//! subjects) and awaited for at most [`SERVICES_GRACE`]; the NATS connection
//! is drained. The report says whether every task ended in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::broker::{Bus, BusError, ClusterConfig, NatsBus, Outgoing, Published};
use crate::config::Config;
use crate::control::{Control, NodeInfo};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::model::ConnId;
use crate::presence::Presence;
use crate::rooms::{LogMode, RoomIndex, RoomLimits};
use crate::transport::tls::Tls;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading verification keys failed")]
    Keys(#[from] crate::auth::KeyError),
    #[error("cluster mode could not start")]
    Cluster(#[from] crate::broker::nats::ClusterError),
    #[error("loading the TLS certificate failed")]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error("the token revocation list could not be loaded")]
    Revocations(#[from] crate::control::RevokeError),
    #[error("subscribing to the control subjects failed: {0}")]
    Control(String),
}

/// Shared state of one gateway node.
pub struct Node {
    pub cfg: Config,
    pub rooms: Arc<RoomIndex>,
    pub verifier: Verifier,
    pub bus: Bus,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Orders from the server API to connections on every gateway, and
    /// token revocations.
    pub control: Arc<Control>,
    /// Cluster-wide room presence.
    pub presence: Arc<Presence>,
    /// Present when serving `wss://`.
    pub(crate) tls: Option<Arc<Tls>>,
    pub(crate) conn_seq: AtomicU64,
    pub(crate) conns: Arc<AtomicUsize>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// The background tasks (see the module doc), stopped after the
    /// connections by `services_stop`.
    pub(crate) services: TaskTracker,
    pub(crate) services_stop: CancellationToken,
    pub(crate) ready: AtomicBool,
    pub(crate) peak_outbox_bytes: AtomicUsize,
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
                tree: fanout_tree::TreeConfig {
                    limits: fanout_tree::plan::Limits {
                        tree_threshold: cfg.tree_threshold,
                        tree_degree: cfg.tree_degree,
                    },
                    // A shard that far behind has members past their frame cap.
                    max_queue: cfg.outbox_max_frames,
                },
                history_size: cfg.history_size,
                history_max_bytes: cfg.history_max_bytes,
                history_total_bytes: cfg.history_total_bytes,
                dedup_window: cfg.dedup_window,
                dedup_max_keys: cfg.dedup_max_keys,
                max_rooms: cfg.max_rooms,
                max_pending: 10_000,
            },
            mode,
        ));
        let metrics = Metrics::new();
        let services = TaskTracker::new();
        let services_stop = CancellationToken::new();
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
                js_domain: cfg.nats_js_domain.clone(),
            };
            Bus::Nats(
                NatsBus::start(
                    cluster,
                    rooms.clone(),
                    metrics.deliveries_total.clone(),
                    services.clone(),
                    services_stop.clone(),
                )
                .await?,
            )
        };
        let control = match &bus {
            Bus::Embedded => Control::embedded(),
            Bus::Nats(n) => Control::cluster(n, &cfg.nats_prefix, cfg.nats_replicas, cfg.nats_connect_timeout).await?,
        };
        let control = Arc::new(control);
        let presence = Arc::new(Presence::new(
            &cfg.node_id,
            cfg.presence_list_max,
            cfg.presence_interval,
            match &bus {
                Bus::Embedded => None,
                Bus::Nats(n) => Some((n.client().clone(), cfg.nats_prefix.clone())),
            },
            rooms.clone(),
            control.registry.clone(),
        ));
        let limits = Limits::new(&cfg.limits, !cfg.no_rate_limits);
        // The flushers write until the connections have ended.
        for flusher in rooms.flushers().shards() {
            let flusher = flusher.clone();
            spawn_until(&services, &services_stop, async move { flusher.run().await });
        }
        let node = Arc::new(Self {
            cfg,
            rooms,
            verifier,
            bus,
            metrics,
            limits,
            control,
            presence,
            tls,
            conn_seq: AtomicU64::new(1),
            conns: Arc::new(AtomicUsize::new(0)),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            services,
            services_stop,
            ready: AtomicBool::new(true),
            peak_outbox_bytes: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&node);
        let info: crate::control::InfoFn = Arc::new(move || match weak.upgrade() {
            Some(n) => n.info(),
            None => NodeInfo {
                node: String::new(),
                connections: 0,
                rooms: 0,
                users: 0,
                draining: true,
            },
        });
        node.control
            .start(info, &node.services, &node.services_stop)
            .await
            .map_err(|e| StartError::Control(e.to_string()))?;
        node.presence
            .start(&node.services, &node.services_stop)
            .await
            .map_err(|e| StartError::Control(e.to_string()))?;
        Ok(node)
    }

    /// This node's counts, as the server API's `info` shows them.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            node: self.cfg.node_id.clone(),
            connections: self.conns_active() as u64,
            rooms: self.rooms.len() as u64,
            users: self.control.registry.users() as u64,
            draining: self.is_draining(),
        }
    }

    /// Starts the background services that need a running server: the JWKS
    /// refresher, the TLS watcher and the rate-limit sweep (in its own task,
    /// so a sweep over many keys never pauses accepts). Call once, from
    /// `serve`.
    pub(crate) fn start_services(self: &Arc<Self>) {
        for source in self.verifier.remote_sources() {
            // Not raced against the token: the loop checks it between
            // fetches, so a fetch in flight finishes (bounded by its
            // timeout) and no detached fetch outlives the task.
            self.services
                .spawn(source.clone().refresh_loop(self.services_stop.clone()));
            // Its fetches run in tasks of its own: end them with the services.
            let (source, stop) = (source.clone(), self.services_stop.clone());
            self.services.spawn(async move {
                stop.cancelled().await;
                source.tasks().close();
                source.tasks().wait().await;
            });
        }
        if let Some(tls) = &self.tls {
            self.services.spawn(crate::transport::tls::watch(
                tls.clone(),
                self.cfg.tls_reload,
                self.services_stop.clone(),
            ));
        }
        let node = self.clone();
        self.spawn_service(async move { node.limits.sweep_forever().await });
        // The exporter keeps each histogram's raw samples until they are
        // folded into buckets, at a scrape or here: without it a node nobody
        // scrapes grows by every publish and subscribe it times.
        self.spawn_service(async {
            let handle = crate::metrics::prometheus();
            let mut tick = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }

    /// Runs `task` as a background service of this node: it is tracked and
    /// dropped when the services stop, after the connections ended (see
    /// the module doc). For tasks of the embedding program (a SIGHUP
    /// handler, a second listener) that must not outlive the node's drain.
    pub fn spawn_service(&self, task: impl Future<Output = ()> + Send + 'static) {
        spawn_until(&self.services, &self.services_stop, task);
    }

    /// Publishes `out` through the bus, as a client's or the server API's
    /// publish: counts it (`gateway_published_messages_total` and the local
    /// deliveries, or `gateway_deduplicated_messages_total` for a key seen
    /// before)
    /// and records its duration in `gateway_publish_seconds`, successful
    /// publishes only. Errors: the bus's ([`BusError`]), not counted.
    pub async fn publish(&self, out: Outgoing<'_>) -> Result<Published, BusError> {
        let started = Instant::now();
        let p = self.bus.publish(self.rooms.as_ref(), out).await?;
        let m = &self.metrics;
        if p.fresh {
            m.published_total.increment(1);
            m.deliveries_total.increment(p.delivered as u64);
        } else {
            m.deduplicated_total.increment(1);
        }
        m.publish_seconds.record(started.elapsed().as_secs_f64());
        Ok(p)
    }

    /// Tasks of this node still running (connections and services).
    pub fn tasks_alive(&self) -> usize {
        self.tracker.len() + self.services.len()
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
            crate::transport::tls::reload_logged(tls);
        }
    }

    /// Highest number of bytes queued for any one closed connection.
    pub fn peak_outbox_bytes(&self) -> usize {
        self.peak_outbox_bytes.load(Ordering::Relaxed)
    }
}

/// Runs `task` on `tracker` until it ends or `stop` is cancelled.
fn spawn_until(tracker: &TaskTracker, stop: &CancellationToken, task: impl Future<Output = ()> + Send + 'static) {
    let stop = stop.clone();
    tracker.spawn(async move {
        tokio::select! {
            () = task => {}
            () = stop.cancelled() => {}
        }
    });
}

/// How long the background services (and the NATS connection) may take to
/// end once the connections have: they end at their token, so this is a
/// bound, not a wait. A drain takes at most the drain timeout plus this.
pub const SERVICES_GRACE: Duration = Duration::from_secs(2);

/// What a shutdown achieved.
#[derive(Debug, Clone, Copy)]
pub struct DrainReport {
    /// Connections open when the drain began.
    pub conns_at_start: usize,
    /// Whether every task of the node ended in time: connections within the
    /// drain timeout, then background services (flushers, broker, watchers)
    /// and the NATS connection within [`SERVICES_GRACE`].
    pub clean: bool,
    /// How long the drain took.
    pub elapsed: Duration,
}

pub(crate) async fn drain(node: &Node) -> DrainReport {
    let started = Instant::now();
    node.ready.store(false, Ordering::Relaxed);
    let conns_at_start = node.conns_active();
    tracing::info!(conns = conns_at_start, timeout = ?node.cfg.drain_timeout, "draining");
    node.shutdown.cancel();
    node.tracker.close();
    let conns_ended = tokio::time::timeout(node.cfg.drain_timeout, node.tracker.wait())
        .await
        .is_ok();
    if !conns_ended {
        tracing::warn!(
            left = node.conns_active(),
            "drain timed out with connections still open"
        );
    }
    // The connections are gone: leave the bus subjects and stop the rest.
    node.services_stop.cancel();
    node.services.close();
    let services_ended = tokio::time::timeout(SERVICES_GRACE, node.services.wait()).await.is_ok();
    let bus_closed = node.bus.close(SERVICES_GRACE).await;
    if !services_ended || !bus_closed {
        tracing::warn!(
            tasks = node.services.len(),
            bus_closed,
            "background tasks did not end in time"
        );
    }
    let report = DrainReport {
        conns_at_start,
        clean: conns_ended && services_ended && bus_closed,
        elapsed: started.elapsed(),
    };
    if report.clean {
        tracing::info!(elapsed = ?report.elapsed, "drain complete");
    }
    report
}
