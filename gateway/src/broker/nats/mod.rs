//! Cluster mode: rooms over NATS, durable rooms in JetStream.
//!
//! Subjects (prefix `gw` by default):
//! - `gw.store.<p>.<room>`: a durable publish, stored in stream `GW_ROOMS_<p>`
//!   where `p` is a hash of the room name modulo the partition count.
//! - `gw.room.<room>`: the room's fan-out subject. Each stream republishes
//!   every stored message there with its sequence (`Nats-Sequence`, the
//!   offset) and the room's previous sequence (`Nats-Last-Sequence`).
//!   Ephemeral rooms are published there directly, without storage.
//!
//! A node subscribes to `gw.room.<room>` only while the room has local
//! members (plus a linger), so NATS carries one copy of each message per
//! interested gateway; there is no wildcard subscription anywhere.
//!
//! Order and completeness: messages arrive in stream order; a message whose
//! previous sequence is newer than the room's last offset reveals a gap, and
//! the missing messages are read from the stream before later ones are
//! applied. After a reconnect every live room is checked against the stream's
//! last sequence the same way.
//!
//! Concurrency: one task per subscribed room feeds [`RoomEvents::deliver`];
//! making a room live, backfilling its cache and repairing gaps are
//! single-flight per room.
//!
//! Tasks: every task of the bus (the connection watcher, the delivery
//! sweeper, room subscribers, repairs, settle checks, resyncs and the linger
//! pool) is spawned on the tracker given to [`NatsBus::start`] and ends when
//! its token is cancelled; [`NatsBus::close`] then drains the NATS
//! connection. Delayed unsubscribes go through one bounded pool (`linger`).

mod follow;
pub use follow::follow;
mod linger;
mod read;
mod repair;
mod scan;
mod streams;

pub use streams::check_stream;
#[cfg(test)]
use streams::stream_config;
use streams::{ensure_stream, stream_name};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use dashmap::DashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;
use proto::Message as _;
use proto::bus::Envelope;
use tokio::sync::{Notify, OnceCell};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use linger::{LINGER_QUEUE, Linger, linger_pool};
use read::Stored;
use scan::{Answer, ScanEnd, Start, StreamReads, scan};

use super::events::{Catchup, Delivered, Gap, Published, RoomEvents, Rooms};
use super::{BusError, Fetched, Outgoing, UnavailableKind, now_ms};
use crate::model::{Message, RoomId};
use crate::protocol::SharedMessage;

/// Settings of cluster mode.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub urls: Vec<String>,
    /// Node name shown in NATS monitoring.
    pub name: String,
    /// Subject prefix (default `gw`); streams are named `<PREFIX>_ROOMS_<p>`.
    pub prefix: String,
    /// Number of room streams.
    pub partitions: u32,
    /// Stream replicas.
    pub replicas: usize,
    /// Messages kept per room (the per-subject limit of the streams).
    pub history: i64,
    /// Age after which stored messages expire; zero keeps them.
    pub max_age: Duration,
    /// Publish de-duplication window.
    pub dedup_window: Duration,
    /// Room-name prefixes of ephemeral rooms (no storage).
    pub ephemeral_prefixes: Vec<String>,
    /// How long a room stays subscribed after its last local member left.
    pub linger: Duration,
    /// How long a publish may wait for the stream's acknowledgement.
    pub publish_timeout: Duration,
    /// How long to wait for NATS at start.
    pub connect_timeout: Duration,
    /// Connect only to `urls`, never to servers the cluster announces.
    pub ignore_discovered: bool,
    /// The JetStream domain of the streams (a node behind a leaf node whose
    /// JetStream runs in the hub): API requests go to `$JS.<domain>.API`.
    pub js_domain: Option<String>,
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {urls}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream request for stream {stream} failed")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "stream {stream} would lose messages the gateway promises to keep: {limit} ({detail}); fix or delete the stream, or change the gateway's settings"
    )]
    Unsafe {
        stream: String,
        limit: &'static str,
        detail: String,
    },
}

/// A room's link to NATS on this node.
#[derive(Default)]
struct RoomLink {
    live: OnceCell<()>,
    task: Mutex<Option<AbortHandle>>,
    /// Catch-up reads of the room from its stream, one at a time: a join
    /// storm reads once and the others find the messages in the cache.
    reads: tokio::sync::Mutex<()>,
}

impl Drop for RoomLink {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }
}

/// The NATS bus.
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The rooms of this node, told what arrives (one dynamic call per
    /// message; the fan-out to members happens behind it).
    rooms: Arc<dyn Rooms>,
    cfg: ClusterConfig,
    streams: Vec<stream::Stream>,
    /// The direct-get subject of each stream (`$JS.API.DIRECT.GET.<stream>`,
    /// `$JS.<domain>.API...` with a JetStream domain).
    direct_get: Vec<String>,
    links: DashMap<RoomId, Arc<RoomLink>>,
    /// Offsets acknowledged to local publishers, not yet seen on the fan-out
    /// subject: checked by the sweeper so a lost republish is repaired.
    expected: DashMap<RoomId, (u64, Instant)>,
    link_state: Arc<LinkState>,
    /// Delayed unsubscribes (one bounded pool, not a task per room).
    linger: Linger,
    /// Where every task of the bus runs; `stop` ends them all.
    tasks: TaskTracker,
    stop: CancellationToken,
    /// The node's `gateway_deliveries_total` handle (no lookup per message).
    deliveries: metrics::Counter,
    /// `gateway_jetstream_publish_seconds`.
    publish_seconds: metrics::Histogram,
}

/// The connection state, written by the NATS event callback: transitions
/// are coalesced into a flag and a wake-up, so no queue of events can grow.
#[derive(Default)]
struct LinkState {
    connected: AtomicBool,
    /// Woken on each (re)connect; a wake-up while a resync runs is kept
    /// (one permit), so the rooms are checked again once it ends.
    reconnected: Notify,
    /// Cancelled when the connection is closed for good (after a drain).
    closed: CancellationToken,
}

impl LinkState {
    fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                tracing::info!("NATS connected");
                if !self.connected.swap(true, Ordering::Relaxed) {
                    crate::metrics::nats_reconnected();
                }
                self.reconnected.notify_one();
            }
            async_nats::Event::Disconnected => {
                tracing::warn!("NATS disconnected; durable publishes answer unavailable until it is back");
                if self.connected.swap(false, Ordering::Relaxed) {
                    crate::metrics::nats_disconnected();
                }
            }
            async_nats::Event::Closed => {
                tracing::debug!("NATS connection closed");
                self.connected.store(false, Ordering::Relaxed);
                self.closed.cancel();
            }
            other => tracing::debug!(event = %other, "NATS event"),
        }
    }
}

/// When a room that just went live is checked against the stream's tail.
const SETTLE_CHECKS: [Duration; 2] = [Duration::from_millis(250), Duration::from_secs(2)];
const SEQ: &str = "Nats-Sequence";
const LAST_SEQ: &str = "Nats-Last-Sequence";
const MSG_ID: &str = "Nats-Msg-Id";
const SUBJECT: &str = "Nats-Subject";
const PENDING: &str = "Nats-Num-Pending";
const EPHEMERAL: &str = "Gw-Ephemeral";
/// Attempts to read a gap before giving up on the part the stream lacks.
const REPAIR_ATTEMPTS: u32 = 30;
/// Messages per fetch request when reading a room from its stream.
const FETCH_BATCH: usize = 256;
/// Messages asked for per direct-get batch request.
const DIRECT_BATCH: usize = 256;
/// How long a direct-get answer may take, per message.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at a history page whose oldest messages left the stream while
/// it was read.
const HISTORY_ATTEMPTS: u32 = 3;

/// The stream partition of `room` among `partitions`: FNV-1a of the name,
/// stable across processes and versions (every node and tool computes the
/// same), `0..partitions`.
pub fn partition(room: &str, partitions: u32) -> u32 {
    // FNV-1a: stable across processes and versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// Escapes `s` for a NATS header value (no CR/LF, no spaces) and for a
/// part of a `/`-separated id: `%`, `/` and bytes outside printable ASCII
/// become `%XX`.
fn header_safe(s: &str, out: &mut String) {
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' && b != b'/' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The JetStream API prefix: `$JS.API`, or `$JS.<domain>.API`.
fn js_api_prefix(cfg: &ClusterConfig) -> String {
    match &cfg.js_domain {
        Some(domain) => format!("$JS.{domain}.API"),
        None => "$JS.API".to_string(),
    }
}

/// The `Nats-Msg-Id` of a publish with `key` by `from` (the publisher's
/// `sub`) in `room`: `<room>/<from>/<key>`, each part escaped, so keys of
/// different users or rooms never collide in the stream's de-duplication.
fn msg_id(room: &RoomId, from: &str, key: &str) -> String {
    let mut id = String::with_capacity(room.as_str().len() + from.len() + key.len() + 2);
    header_safe(room.as_str(), &mut id);
    id.push('/');
    header_safe(from, &mut id);
    id.push('/');
    header_safe(key, &mut id);
    id
}

impl NatsBus {
    /// Connects, checks or creates the room streams, and starts the
    /// reconnect watcher, the delivery sweeper and the linger pool. Every
    /// task of the bus, now and later, runs on `tasks` and ends once `stop`
    /// is cancelled.
    pub async fn start(
        cfg: ClusterConfig,
        rooms: Arc<dyn Rooms>,
        deliveries: metrics::Counter,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, ClusterError> {
        let link_state = Arc::new(LinkState {
            connected: AtomicBool::new(true),
            reconnected: Notify::new(),
            closed: CancellationToken::new(),
        });
        let events = link_state.clone();
        let mut opts = async_nats::ConnectOptions::new();
        if cfg.ignore_discovered {
            opts = opts.ignore_discovered_servers();
        }
        let opts = opts
            .name(&cfg.name)
            .connection_timeout(cfg.connect_timeout)
            .request_timeout(Some(Duration::from_secs(5)))
            .max_reconnects(None)
            .event_callback(move |event| {
                events.on_event(event);
                async {}
            });
        let urls = cfg.urls.join(",");
        let client = opts
            .connect(cfg.urls.as_slice())
            .await
            .map_err(|source| ClusterError::Connect { urls, source })?;
        let mut js = match &cfg.js_domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        js.set_timeout(cfg.publish_timeout);
        let mut streams = Vec::with_capacity(cfg.partitions as usize);
        for p in 0..cfg.partitions {
            streams.push(ensure_stream(&js, &cfg, p).await?);
        }
        let direct_get = (0..cfg.partitions)
            .map(|p| format!("{}.DIRECT.GET.{}", js_api_prefix(&cfg), stream_name(&cfg, p)))
            .collect();
        let (linger, pool) = linger_pool(cfg.linger, LINGER_QUEUE);
        let bus = Arc::new(Self {
            client,
            js,
            rooms,
            cfg,
            streams,
            direct_get,
            links: DashMap::new(),
            expected: DashMap::new(),
            link_state,
            linger,
            tasks,
            stop,
            deliveries,
            publish_seconds: crate::metrics::jetstream_publish_seconds(),
        });
        crate::metrics::nats_registered();
        // Resyncs run one at a time in this task; reconnects during one are
        // coalesced into one more pass.
        let weak = Arc::downgrade(&bus);
        let state = bus.link_state.clone();
        bus.spawn(async move {
            loop {
                state.reconnected.notified().await;
                let Some(bus) = weak.upgrade() else { return };
                bus.resync_all().await;
            }
        });
        let weak = Arc::downgrade(&bus);
        bus.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(bus) = weak.upgrade() else { return };
                bus.sweep_expected();
            }
        });
        let weak = Arc::downgrade(&bus);
        bus.spawn(pool.run(bus.stop.clone(), move |room| {
            if let Some(bus) = weak.upgrade() {
                bus.unsubscribe_if_empty(&room);
            }
        }));
        Ok(bus)
    }

    /// Runs `task` on the bus's tracker until it ends or the bus stops.
    /// Nothing is started once the bus is stopping.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if self.stop.is_cancelled() {
            return;
        }
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Closes the NATS connection after the bus's tasks ended: the
    /// subscriptions they dropped are sent (UNSUB) and the connection's own
    /// tasks end. Waits at most `within`.
    pub async fn close(&self, within: Duration) -> bool {
        self.stop.cancel();
        let drained = async {
            if self.client.drain().await.is_ok() {
                self.link_state.closed.cancelled().await;
            }
        };
        tokio::time::timeout(within, drained).await.is_ok()
    }

    /// The NATS connection, for the node's other users of NATS (the
    /// control subject of the server API, presence).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context (with the configured domain), for the node's
    /// other buckets (token revocations).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn is_connected(&self) -> bool {
        self.link_state.connected.load(Ordering::Relaxed)
            && self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub fn is_ephemeral(&self, room: &RoomId) -> bool {
        self.cfg
            .ephemeral_prefixes
            .iter()
            .any(|p| room.as_str().starts_with(p.as_str()))
    }

    fn store_subject(&self, room: &RoomId) -> String {
        format!(
            "{}.store.{}.{}",
            self.cfg.prefix,
            partition(room.as_str(), self.cfg.partitions),
            room
        )
    }

    fn fanout_subject(&self, room: &RoomId) -> String {
        format!("{}.room.{}", self.cfg.prefix, room)
    }

    fn stream_of(&self, room: &RoomId) -> &stream::Stream {
        &self.streams[partition(room.as_str(), self.cfg.partitions) as usize]
    }

    /// Publishes: durable rooms are acknowledged only once stored.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<Published, BusError> {
        if !self.is_connected() {
            if !self.is_ephemeral(msg.room) {
                crate::metrics::jetstream_publish_failed("not_connected");
            }
            return Err(BusError::unavailable(UnavailableKind::NotConnected));
        }
        let payload = Envelope {
            from: msg.from.to_owned(),
            ts_ms: now_ms(),
            data: bytes::Bytes::copy_from_slice(msg.data),
        }
        .encode_to_vec();
        if self.is_ephemeral(msg.room) {
            let mut headers = HeaderMap::new();
            headers.insert(EPHEMERAL, "1");
            self.client
                .publish_with_headers(self.fanout_subject(msg.room), headers, payload.into())
                .await
                .map_err(BusError::nats(UnavailableKind::Publish))?;
            return Ok(Published {
                offset: 0,
                fresh: true,
                delivered: 0,
            });
        }
        let mut headers = HeaderMap::new();
        if let Some(key) = msg.key {
            // De-duplication is per stream; scope the key to the room and
            // the publisher.
            headers.insert(MSG_ID, msg_id(msg.room, msg.from, key).as_str());
        }
        let ack = async {
            let fut = self
                .js
                .publish_with_headers(self.store_subject(msg.room), headers, payload.into())
                .await
                .map_err(BusError::nats(UnavailableKind::Publish))?;
            fut.await.map_err(BusError::nats(UnavailableKind::Publish))
        };
        let started = Instant::now();
        let ack = match tokio::time::timeout(self.cfg.publish_timeout, ack).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => {
                crate::metrics::jetstream_publish_failed("error");
                return Err(e);
            }
            Err(_) => {
                crate::metrics::jetstream_publish_failed("timeout");
                return Err(BusError::Timeout);
            }
        };
        self.publish_seconds.record(started.elapsed().as_secs_f64());
        if self.rooms.is_live(msg.room) {
            self.expected
                .entry(msg.room.clone())
                .and_modify(|e| {
                    if ack.sequence > e.0 {
                        *e = (ack.sequence, Instant::now());
                    }
                })
                .or_insert((ack.sequence, Instant::now()));
        }
        Ok(Published {
            offset: ack.sequence,
            fresh: !ack.duplicate,
            delivered: 0,
        })
    }

    fn link(&self, room: &RoomId) -> Arc<RoomLink> {
        self.links.entry(room.clone()).or_default().clone()
    }

    /// Subscribes to the room's fan-out subject and learns its last offset,
    /// once per room however many joiners wait on it.
    pub async fn ensure_live(self: &Arc<Self>, room: &RoomId) -> Result<(), BusError> {
        let link = self.link(room);
        link.live
            .get_or_try_init(|| async {
                let mut sub = self
                    .client
                    .subscribe(self.fanout_subject(room))
                    .await
                    .map_err(BusError::nats(UnavailableKind::Subscribe))?;
                self.client
                    .flush()
                    .await
                    .map_err(BusError::nats(UnavailableKind::Flush))?;
                let last = if self.is_ephemeral(room) {
                    0
                } else {
                    self.last_seq_retrying(room).await?
                };
                let bus = Arc::downgrade(self);
                let task_room = room.clone();
                let stop = self.stop.clone();
                let task = self.tasks.spawn(async move {
                    // Ends at stop, dropping the subscription (an UNSUB).
                    loop {
                        let msg = tokio::select! {
                            msg = sub.next() => msg,
                            () = stop.cancelled() => return,
                        };
                        let Some(msg) = msg else { return };
                        let Some(bus) = bus.upgrade() else { return };
                        bus.on_message(&task_room, msg);
                    }
                });
                *link.task.lock() = Some(task.abort_handle());
                if let Some(gap) = self.rooms.go_live(room, last) {
                    self.spawn_repair(room.clone(), gap);
                }
                if !self.is_ephemeral(room) {
                    self.spawn_settle_check(room.clone());
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    fn on_message(self: &Arc<Self>, room: &RoomId, msg: async_nats::Message) {
        // Arrival on this node: `gateway_fanout_seconds` counts from here.
        let arrived = Instant::now();
        match arrive(&*self.rooms, room, msg.headers.as_ref(), &msg.payload) {
            Arrival::Fanned { members, ts_ms } => {
                self.deliveries.increment(members as u64);
                crate::metrics::fanned_out(arrived.elapsed(), ts_ms);
            }
            Arrival::Gap(gap) => self.spawn_repair(room.clone(), gap),
            Arrival::Quiet => {}
        }
    }

    /// The last local member left: unsubscribe after the linger unless one
    /// came back.
    ///
    /// The linger pool is bounded. When it is full (tens of thousands of
    /// rooms left within moments, faster than its task takes them) the room
    /// is unsubscribed at once if still empty: memory stays bounded and the
    /// subscription state stays right; the price is a resubscribe if a
    /// member comes back. Keeping the room instead would leave a
    /// subscription nobody removes.
    pub fn room_left(self: &Arc<Self>, room: &RoomId) {
        if !self.linger.schedule(room.clone()) {
            tracing::debug!(%room, "linger pool full; unsubscribing now");
            self.unsubscribe_if_empty(room);
        }
    }

    fn unsubscribe_if_empty(&self, room: &RoomId) {
        if self.rooms.forget_if_empty(room) {
            // Dropping the link aborts the room task, which drops the
            // subscription (an UNSUB to NATS).
            self.links.remove(room);
            self.expected.remove(room);
            tracing::debug!(%room, "room unsubscribed");
        }
    }

    fn sweep_expected(self: &Arc<Self>) {
        let now = Instant::now();
        let mut due: Vec<(RoomId, u64)> = Vec::new();
        self.expected.retain(|room, (seq, at)| {
            let last = self.rooms.last_offset(room);
            if last >= *seq || !self.rooms.is_live(room) {
                return false;
            }
            if now.duration_since(*at) > Duration::from_millis(500) {
                due.push((room.clone(), *seq));
                return false;
            }
            true
        });
        for (room, seq) in due {
            let bus = self.clone();
            self.spawn(async move { bus.repair_to(room, seq).await });
        }
    }
}

/// What one message on a room's fan-out subject came to.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// Offered to `members` (a stored message that was applied, or an
    /// ephemeral one that reached someone); `ts_ms` is its publish time.
    Fanned { members: usize, ts_ms: u64 },
    /// A hole before it: the caller now holds the gap and repairs it.
    Gap(Gap),
    /// Nothing to count: undecodable, a duplicate, kept for later, no room
    /// state, or an ephemeral message without members.
    Quiet,
}

/// Reports one message of `room`'s fan-out subject to `rooms`: a stored one
/// (it has `Nats-Sequence`) with its offset and the room's previous offset
/// (`Nats-Last-Sequence`, 0 when missing) through [`RoomEvents::deliver`], an
/// ephemeral one through [`RoomEvents::broadcast_unstored`]. One call into
/// the rooms per message.
fn arrive<R>(rooms: &R, room: &RoomId, headers: Option<&HeaderMap>, payload: &[u8]) -> Arrival
where
    R: RoomEvents + ?Sized,
{
    let get = |name: &str| {
        headers
            .and_then(|h| h.get_last(name))
            .and_then(|v| v.as_str().parse::<u64>().ok())
    };
    let Ok(env) = Envelope::decode(payload) else {
        tracing::warn!(%room, "undecodable message on the fan-out subject");
        return Arrival::Quiet;
    };
    let Some(seq) = get(SEQ) else {
        // Ephemeral: not stored, no offset.
        let members = rooms.broadcast_unstored(room, &encode(room, 0, &env));
        return if members > 0 {
            Arrival::Fanned {
                members,
                ts_ms: env.ts_ms,
            }
        } else {
            Arrival::Quiet
        };
    };
    let prev = get(LAST_SEQ).unwrap_or(0);
    if prev == 0 {
        tracing::debug!(%room, seq, "message without a previous offset");
    }
    match rooms.deliver(room, seq, prev, encode(room, seq, &env)) {
        Delivered::Gap(gap) => Arrival::Gap(gap),
        Delivered::Applied { members } => Arrival::Fanned {
            members,
            ts_ms: env.ts_ms,
        },
        Delivered::Duplicate | Delivered::Buffered | Delivered::NoRoom => Arrival::Quiet,
    }
}

/// The typed message of an envelope read or received for `room` at
/// `offset` (0: ephemeral), stored once with its JSON push encoded.
fn encode(room: &RoomId, offset: u64, env: &Envelope) -> SharedMessage {
    SharedMessage::new(Message {
        room: room.clone(),
        offset,
        ts: env.ts_ms,
        from: env.from.clone(),
        data: env.data.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClusterConfig {
        ClusterConfig {
            urls: vec![],
            name: "t".into(),
            prefix: "gw".into(),
            partitions: 4,
            replicas: 3,
            history: 1000,
            max_age: Duration::ZERO,
            dedup_window: Duration::from_secs(120),
            ephemeral_prefixes: vec![],
            linger: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ignore_discovered: false,
            js_domain: None,
        }
    }

    /// A fake of the rooms that records what the broker reports and answers
    /// `deliver` from a script.
    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<String>>,
        answers: Mutex<std::collections::VecDeque<Delivered>>,
        unstored_members: usize,
    }

    impl Recorder {
        fn note(&self, event: String) {
            self.events.lock().push(event);
        }
    }

    impl RoomEvents for Recorder {
        fn publish(
            &self,
            _: &RoomId,
            _: &str,
            _: &bytes::Bytes,
            _: Option<&str>,
            _: u64,
            _: Instant,
        ) -> Result<Published, crate::error::RoomError> {
            unreachable!("the NATS bus never publishes through the rooms")
        }
        fn deliver(&self, room: &RoomId, seq: u64, prev: u64, msg: SharedMessage) -> Delivered {
            let m = msg.message();
            self.note(format!(
                "deliver {room} {seq} after {prev}: offset {} from {} at {} {:?}",
                m.offset, m.from, m.ts, m.data
            ));
            self.answers.lock().pop_front().expect("a scripted answer")
        }
        fn broadcast_unstored(&self, room: &RoomId, msg: &SharedMessage) -> usize {
            self.note(format!("unstored {room}: offset {}", msg.offset()));
            self.unstored_members
        }
        fn go_live(&self, room: &RoomId, last: u64) -> Option<Gap> {
            self.note(format!("live {room} at {last}"));
            None
        }
        fn request_repair(&self, room: &RoomId, tail: u64) -> Option<Gap> {
            self.note(format!("repair {room} to {tail}"));
            None
        }
        fn repaired(&self, room: &RoomId, _: Vec<(u64, SharedMessage)>, upto: u64) -> Option<Gap> {
            self.note(format!("repaired {room} to {upto}"));
            None
        }
        fn repair_failed(&self, room: &RoomId) {
            self.note(format!("repair failed {room}"));
        }
        fn lost_messages(&self, room: &RoomId, gone_upto: u64) -> usize {
            self.note(format!("lost {room} to {gone_upto}"));
            0
        }
        fn gap_unread(&self, room: &RoomId, upto: u64) -> usize {
            self.note(format!("unread {room} to {upto}"));
            0
        }
        fn forget_if_empty(&self, room: &RoomId) -> bool {
            self.note(format!("forget {room}"));
            false
        }
    }

    fn envelope(from: &str, ts_ms: u64, data: &'static [u8]) -> Vec<u8> {
        Envelope {
            from: from.into(),
            ts_ms,
            data: bytes::Bytes::from_static(data),
        }
        .encode_to_vec()
    }

    fn stored(seq: u64, prev: Option<u64>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SEQ, seq.to_string().as_str());
        if let Some(prev) = prev {
            h.insert(LAST_SEQ, prev.to_string().as_str());
        }
        h
    }

    /// Issue 11: what arrives on a room's fan-out subject reaches the rooms
    /// as one event each, in arrival order (out of order included: ordering
    /// is the rooms' job), and what the rooms answer decides what the broker
    /// does next (count a fan-out, repair a gap, or nothing).
    #[test]
    fn fan_out_messages_become_one_room_event_each() {
        let r = RoomId::parse("kr").unwrap();
        let rooms = Recorder {
            answers: Mutex::new(
                [
                    Delivered::Buffered,
                    Delivered::Gap(Gap { after: 10, upto: 11 }),
                    Delivered::Applied { members: 3 },
                    Delivered::Duplicate,
                    Delivered::Applied { members: 0 },
                    Delivered::NoRoom,
                ]
                .into(),
            ),
            ..Recorder::default()
        };
        let msg = envelope("alice", 7, b"{}");
        let got = [
            // Before the room is live, then ahead of a gap, then in order.
            arrive(&rooms, &r, Some(&stored(12, Some(11))), &msg),
            arrive(&rooms, &r, Some(&stored(12, Some(11))), &msg),
            arrive(&rooms, &r, Some(&stored(13, Some(12))), &msg),
            arrive(&rooms, &r, Some(&stored(13, Some(12))), &msg),
            // No previous offset: reported as 0 (unknown).
            arrive(&rooms, &r, Some(&stored(14, None)), &msg),
            arrive(&rooms, &r, Some(&stored(15, Some(14))), &msg),
            // Not decodable: nothing reaches the rooms.
            arrive(&rooms, &r, Some(&stored(16, Some(15))), b"\xff\xff"),
            // Ephemeral (no sequence), nobody to reach.
            arrive(&rooms, &r, None, &envelope("bob", 8, b"1")),
        ];
        assert_eq!(
            got,
            [
                Arrival::Quiet,
                Arrival::Gap(Gap { after: 10, upto: 11 }),
                Arrival::Fanned { members: 3, ts_ms: 7 },
                Arrival::Quiet,
                Arrival::Fanned { members: 0, ts_ms: 7 },
                Arrival::Quiet,
                Arrival::Quiet,
                Arrival::Quiet,
            ]
        );
        let ephemeral = Recorder {
            unstored_members: 2,
            ..Recorder::default()
        };
        assert_eq!(
            arrive(&ephemeral, &r, None, &envelope("bob", 8, b"1")),
            Arrival::Fanned { members: 2, ts_ms: 8 }
        );
        let deliver =
            |seq: u64, prev: u64| format!("deliver kr {seq} after {prev}: offset {seq} from alice at 7 b\"{{}}\"");
        assert_eq!(
            *rooms.events.lock(),
            [
                deliver(12, 11),
                deliver(12, 11),
                deliver(13, 12),
                deliver(13, 12),
                deliver(14, 0),
                deliver(15, 14),
                "unstored kr: offset 0".to_string(),
            ]
        );
        assert_eq!(*ephemeral.events.lock(), ["unstored kr: offset 0"]);
    }

    #[test]
    fn a_js_domain_moves_the_api_subjects() {
        assert_eq!(js_api_prefix(&cfg()), "$JS.API");
        let hub = ClusterConfig {
            js_domain: Some("hub".into()),
            ..cfg()
        };
        assert_eq!(js_api_prefix(&hub), "$JS.hub.API");
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition("general", 8), partition("general", 8));
        let mut seen = [0; 8];
        for i in 0..800 {
            seen[partition(&format!("room-{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn our_own_stream_config_passes_the_check() {
        let c = cfg();
        check_stream("GW_ROOMS_0", &stream_config(&c, 0), &c).unwrap();
    }

    #[test]
    fn lossy_streams_are_refused_naming_the_limit() {
        let c = cfg();
        type Change = Box<dyn Fn(&mut stream::Config)>;
        let cases: Vec<(&str, Change)> = vec![
            ("max_msgs", Box::new(|s| s.max_messages = 10_000)),
            ("max_bytes", Box::new(|s| s.max_bytes = 64 << 20)),
            ("max_msgs_per_subject", Box::new(|s| s.max_messages_per_subject = 100)),
            ("max_age", Box::new(|s| s.max_age = Duration::from_secs(60))),
            ("storage", Box::new(|s| s.storage = stream::StorageType::Memory)),
            ("replicas", Box::new(|s| s.num_replicas = 1)),
        ];
        for (limit, change) in cases {
            let mut s = stream_config(&c, 0);
            change(&mut s);
            let err = check_stream("GW_ROOMS_0", &s, &c).unwrap_err();
            assert!(
                matches!(err, ClusterError::Unsafe { limit: l, .. } if l == limit),
                "{limit}: {err}"
            );
            assert!(err.to_string().contains(limit));
        }
        // Discard-new limits refuse publishes instead of dropping: accepted.
        let mut s = stream_config(&c, 0);
        s.max_bytes = 1 << 30;
        s.discard = stream::DiscardPolicy::New;
        check_stream("GW_ROOMS_0", &s, &c).unwrap();
    }

    #[test]
    fn keys_are_header_safe() {
        let mut out = String::new();
        header_safe("a b\r\n%ü/", &mut out);
        assert_eq!(out, "a%20b%0D%0A%25%C3%BC%2F");
    }

    #[test]
    fn message_ids_are_scoped_to_room_user_and_key() {
        let r = RoomId::parse("kr").unwrap();
        assert_eq!(msg_id(&r, "alice", "c1-000001"), "kr/alice/c1-000001");
        assert_ne!(msg_id(&r, "alice", "c1"), msg_id(&r, "bob", "c1"));
        assert_ne!(
            msg_id(&r, "alice", "c1"),
            msg_id(&RoomId::parse("kr2").unwrap(), "alice", "c1")
        );
        // Separators inside a part cannot make two ids equal.
        assert_ne!(msg_id(&r, "a/b", "c"), msg_id(&r, "a", "b/c"));
        assert_eq!(msg_id(&r, "a/b", "c"), "kr/a%2Fb/c");
    }
}
