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
//! Concurrency: one task per subscribed room feeds [`RoomIndex::deliver`];
//! making a room live, backfilling its cache and repairing gaps are
//! single-flight per room.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use dashmap::DashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;
use proto::Message as _;
use proto::bus::Envelope;
use tokio::sync::OnceCell;
use tokio::task::AbortHandle;

use fanout_tree::Weighted;

use super::{BusError, Fetched, Outgoing, now_ms};
use crate::protocol;
use crate::rooms::{Catchup, Delivered, Frame, Gap, Published, RoomId, RoomIndex};

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
    rooms: Arc<RoomIndex>,
    cfg: ClusterConfig,
    streams: Vec<stream::Stream>,
    /// The direct-get subject of each stream (`$JS.API.DIRECT.GET.<stream>`).
    direct_get: Vec<String>,
    links: DashMap<RoomId, Arc<RoomLink>>,
    /// Offsets acknowledged to local publishers, not yet seen on the fan-out
    /// subject: checked by the sweeper so a lost republish is repaired.
    expected: DashMap<RoomId, (u64, Instant)>,
    connected: AtomicBool,
    /// The node's `gateway_deliveries_total` handle (no lookup per message).
    deliveries: metrics::Counter,
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
/// Attempts of a catch-up read that stops short of a stored offset (a
/// replica answering direct gets may lag the leader by a moment).
const SHORT_READ_ATTEMPTS: u32 = 3;

fn partition(room: &str, partitions: u32) -> u32 {
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

/// One message of a room read from its stream by a direct get.
struct Stored {
    seq: u64,
    /// Messages of the room stored after this one (batch answers only).
    pending: Option<u64>,
    payload: bytes::Bytes,
}

/// How a forward read of a catch-up ended.
enum ReadEnd {
    /// Every message up to the asked offset was read.
    Reached,
    /// Some message after `since` may be gone from the stream.
    Lost,
    /// The frames would pass the byte budget.
    OverBudget,
}

/// A catch-up read from the stream in progress.
struct CatchupRead {
    /// Whether the first answer proved that nothing after `since` is gone.
    proved: bool,
    /// Every message of the room in `(since, covered]` is in `read`.
    covered: u64,
    read: Vec<(u64, Frame)>,
    bytes: usize,
    /// Payload bytes received from the stream, kept or not.
    read_bytes: usize,
}

impl NatsBus {
    /// Connects, checks or creates the room streams, and starts the
    /// reconnect watcher and the delivery sweeper.
    pub async fn start(
        cfg: ClusterConfig,
        rooms: Arc<RoomIndex>,
        deliveries: metrics::Counter,
    ) -> Result<Arc<Self>, ClusterError> {
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
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
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            });
        let urls = cfg.urls.join(",");
        let client = opts
            .connect(cfg.urls.as_slice())
            .await
            .map_err(|source| ClusterError::Connect { urls, source })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.publish_timeout);
        let mut streams = Vec::with_capacity(cfg.partitions as usize);
        for p in 0..cfg.partitions {
            streams.push(ensure_stream(&js, &cfg, p).await?);
        }
        let direct_get = (0..cfg.partitions)
            .map(|p| format!("$JS.API.DIRECT.GET.{}", stream_name(&cfg, p)))
            .collect();
        let bus = Arc::new(Self {
            client,
            js,
            rooms,
            cfg,
            streams,
            direct_get,
            links: DashMap::new(),
            expected: DashMap::new(),
            connected: AtomicBool::new(true),
            deliveries,
        });
        let weak = Arc::downgrade(&bus);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(bus) = weak.upgrade() else { return };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connected");
                        bus.connected.store(true, Ordering::Relaxed);
                        let bus = bus.clone();
                        tokio::spawn(async move { bus.resync_all().await });
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS disconnected; durable publishes answer unavailable until it is back");
                        bus.connected.store(false, Ordering::Relaxed);
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
        let weak = Arc::downgrade(&bus);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(bus) = weak.upgrade() else { return };
                bus.sweep_expected();
            }
        });
        Ok(bus)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
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
            return Err(BusError::Unavailable("not connected to NATS".into()));
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
                .map_err(BusError::unavailable)?;
            return Ok(Published {
                offset: 0,
                fresh: true,
                delivered: 0,
                slow: 0,
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
                .map_err(BusError::unavailable)?;
            fut.await.map_err(BusError::unavailable)
        };
        let ack = tokio::time::timeout(self.cfg.publish_timeout, ack)
            .await
            .map_err(|_| BusError::Timeout)??;
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
            slow: 0,
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
                    .map_err(BusError::unavailable)?;
                self.client.flush().await.map_err(BusError::unavailable)?;
                let last = if self.is_ephemeral(room) {
                    0
                } else {
                    self.last_seq_retrying(room).await?
                };
                let bus = Arc::downgrade(self);
                let task_room = room.clone();
                let task = tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
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

    /// Whether messages of `room` after `after` (the last offset this node
    /// applied; 0: none) may have left the stream before this node read them.
    /// If the message at `after` is still stored, nothing after it is gone
    /// (per-room limits and max age drop the oldest first). With nothing
    /// applied, only a room that never dropped a message is safe.
    async fn may_have_lost(&self, room: &RoomId, after: u64) -> bool {
        if after > 0 {
            return !self.still_stored(room, after).await;
        }
        let mut count = None;
        let body = self.forward_request(room, 1, 1, usize::MAX);
        if self
            .direct(room, body, |m| {
                count = m.pending.map(|p| p + 1);
                false
            })
            .await
            .is_err()
        {
            return true;
        }
        count.is_none_or(|c| !self.never_dropped(c))
    }

    /// Whether a room with `stored` messages in its stream can never have
    /// dropped one: no max age, and fewer than the per-room limit.
    fn never_dropped(&self, stored: u64) -> bool {
        self.cfg.max_age.is_zero() && (self.cfg.history <= 0 || stored < self.cfg.history as u64)
    }

    /// Whether the message at `offset` of `room` is still in the stream.
    async fn still_stored(&self, room: &RoomId, offset: u64) -> bool {
        match self.stream_of(room).direct_get(offset).await {
            Ok(m) => m.subject.as_str() == self.store_subject(room),
            Err(_) => false,
        }
    }

    /// [`Self::last_seq`], retried briefly: right after a leader change the
    /// first request may fail.
    async fn last_seq_retrying(&self, room: &RoomId) -> Result<u64, BusError> {
        let mut attempt = 0;
        loop {
            match self.last_seq(room).await {
                Ok(seq) => return Ok(seq),
                Err(e) if attempt >= 3 || !self.is_connected() => return Err(e),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
    }

    /// The stream's last offset for `room` (0 if it has none).
    async fn last_seq(&self, room: &RoomId) -> Result<u64, BusError> {
        match self
            .stream_of(room)
            .direct_get_last_for_subject(self.store_subject(room))
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(BusError::unavailable(e)),
        }
    }

    fn on_message(self: &Arc<Self>, room: &RoomId, msg: async_nats::Message) {
        let headers = msg.headers.as_ref();
        let get = |name: &str| {
            headers
                .and_then(|h| h.get_last(name))
                .and_then(|v| v.as_str().parse::<u64>().ok())
        };
        let Ok(env) = Envelope::decode(msg.payload.as_ref()) else {
            tracing::warn!(%room, "undecodable message on the fan-out subject");
            return;
        };
        let Some(seq) = get(SEQ) else {
            // Ephemeral: not stored, no offset.
            let frame = encode(room, 0, &env);
            self.rooms.broadcast_unstored(room, &frame);
            return;
        };
        let prev = get(LAST_SEQ).unwrap_or(0);
        if prev == 0 {
            tracing::debug!(%room, seq, "message without a previous offset");
        }
        match self.rooms.deliver(room, seq, prev, encode(room, seq, &env)) {
            Delivered::Gap(gap) => self.spawn_repair(room.clone(), gap),
            Delivered::Applied { members } => {
                self.deliveries.increment(members as u64);
            }
            Delivered::Duplicate | Delivered::Buffered | Delivered::NoRoom => {}
        }
    }

    fn spawn_repair(self: &Arc<Self>, room: RoomId, gap: Gap) {
        let bus = self.clone();
        tokio::spawn(async move { bus.repair(room, gap).await });
    }

    /// Reads the messages of a gap from the stream and applies them, then
    /// whatever waited behind the gap; repeats while gaps remain.
    ///
    /// `gap.upto` is an offset known to be stored (a message's previous
    /// offset, the stream's tail, or an acknowledged publish), so a read that
    /// did not reach it is incomplete (for example during a leader election)
    /// and is retried rather than skipped.
    async fn repair(self: Arc<Self>, room: RoomId, mut gap: Gap) {
        let mut attempt = 0u32;
        loop {
            tracing::debug!(%room, after = gap.after, upto = gap.upto, attempt, "repairing a gap");
            metrics::counter!("gateway_bus_gaps_total").increment(u64::from(attempt == 0));
            let read = self.read(&room, gap.after + 1, gap.upto).await;
            let fetched = match read {
                Ok((entries, true)) => entries,
                Ok((entries, false)) if attempt >= REPAIR_ATTEMPTS => {
                    tracing::error!(%room, after = gap.after, upto = gap.upto, "the stream no longer has part of a gap; skipping it");
                    metrics::counter!("gateway_bus_gaps_skipped_total").increment(1);
                    entries
                }
                Ok(_) | Err(_) if attempt < REPAIR_ATTEMPTS => {
                    if let Err(e) = read {
                        tracing::debug!(%room, error = %e, "gap read failed; retrying");
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20)))).await;
                    continue;
                }
                Ok(_) | Err(_) => {
                    tracing::warn!(%room, "gap repair failed; retried on the next message or reconnect");
                    self.rooms.repair_failed(&room);
                    return;
                }
            };
            attempt = 0;
            let first = fetched.first().map_or(gap.upto, |f| f.0);
            if first > gap.after + 1 && self.may_have_lost(&room, gap.after).await {
                // The last message this node applied is gone from the stream,
                // so messages between it and `first` may be gone too: never
                // skip silently; members resume with `since` and are told.
                let closed = self.rooms.lost_messages(&room, first - 1);
                metrics::counter!("gateway_bus_lost_resets_total").increment(1);
                tracing::error!(%room, after = gap.after, first, closed, "messages left the stream before this node read them; members must resume");
            }
            tracing::debug!(
                %room,
                n = fetched.len(),
                first = fetched.first().map(|f| f.0),
                last = fetched.last().map(|f| f.0),
                "gap read"
            );
            match self.rooms.repaired(&room, fetched, gap.upto) {
                Some(next) => gap = next,
                None => return,
            }
        }
    }

    /// Messages of `room` with offsets in `[from, upto]`, oldest first, and
    /// whether the read reached `upto` (saw it or a later message).
    async fn read(&self, room: &RoomId, from: u64, upto: u64) -> Result<(Vec<(u64, Frame)>, bool), BusError> {
        let mut out = Vec::new();
        if from > upto {
            return Ok((out, true));
        }
        let mut reached = false;
        self.read_with(room, from.max(1), |seq, frame| {
            if seq >= upto {
                reached = true;
            }
            if seq > upto {
                return false;
            }
            out.push((seq, frame));
            seq < upto
        })
        .await?;
        Ok((out, reached))
    }

    /// Streams the stored messages of `room` from offset `from` to `each`
    /// until it returns false or the stream has no more.
    async fn read_with(
        &self,
        room: &RoomId,
        from: u64,
        mut each: impl FnMut(u64, Frame) -> bool,
    ) -> Result<(), BusError> {
        metrics::counter!("gateway_bus_reads_total").increment(1);
        let stream = self.stream_of(room);
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: self.store_subject(room),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(BusError::unavailable)?;
        let name = consumer.cached_info().name.clone();
        let mut delivered = 0u64;
        let result = async {
            loop {
                let mut batch = consumer
                    .fetch()
                    .max_messages(FETCH_BATCH)
                    .messages()
                    .await
                    .map_err(BusError::unavailable)?;
                let mut got = 0;
                let mut pending = 0;
                while let Some(m) = batch.next().await {
                    let m = m.map_err(BusError::Unavailable)?;
                    let Ok(info) = m.info() else { continue };
                    let (seq, left) = (info.stream_sequence, info.pending);
                    // A fresh consumer numbers its deliveries 1, 2, 3...: a
                    // jump means a delivery was lost between batches, so the
                    // read is incomplete and the caller retries.
                    delivered += 1;
                    if info.consumer_sequence != delivered {
                        return Err(BusError::Unavailable(
                            format!(
                                "read of {room} skipped deliveries {delivered}..{}",
                                info.consumer_sequence
                            )
                            .into(),
                        ));
                    }
                    got += 1;
                    pending = left;
                    let Ok(env) = Envelope::decode(m.payload.as_ref()) else {
                        continue;
                    };
                    if !each(seq, encode(room, seq, &env)) {
                        return Ok(());
                    }
                }
                if got == 0 || pending == 0 {
                    return Ok(());
                }
            }
        }
        .await;
        let _ = stream.delete_consumer(&name).await;
        result
    }

    /// The body of a direct-get request for up to `batch` messages of `room`
    /// from offset `from` on, stopping after about `max_bytes`.
    fn forward_request(&self, room: &RoomId, from: u64, batch: usize, max_bytes: usize) -> String {
        serde_json::json!({
            "seq": from,
            "next_by_subj": self.store_subject(room),
            "batch": batch,
            "max_bytes": max_bytes.clamp(1, i64::MAX as usize),
        })
        .to_string()
    }

    /// Sends a direct-get request (`body`, JSON) to the stream of `room` and
    /// hands the messages it answers, in order, to `each` until the end of
    /// the batch, "not found", or `each` returns false. Only batch and
    /// `multi_last` requests: they end with an end-of-batch status.
    ///
    /// Errors: NATS unreachable, no answer within [`DIRECT_TIMEOUT`], or an
    /// error status.
    async fn direct(&self, room: &RoomId, body: String, mut each: impl FnMut(Stored) -> bool) -> Result<(), BusError> {
        metrics::counter!("gateway_bus_reads_total").increment(1);
        let subject = self.store_subject(room);
        let inbox = self.client.new_inbox();
        // Dropping the subscription (an UNSUB) ends an answer read in part.
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(BusError::unavailable)?;
        let target = &self.direct_get[partition(room.as_str(), self.cfg.partitions) as usize];
        self.client
            .publish_with_reply(target.clone(), inbox, body.into())
            .await
            .map_err(BusError::unavailable)?;
        loop {
            let msg = tokio::time::timeout(DIRECT_TIMEOUT, sub.next())
                .await
                .map_err(|_| BusError::Timeout)?
                .ok_or_else(|| BusError::Unavailable("direct get: subscription ended".into()))?;
            if let Some(status) = msg.status {
                // 204: end of batch; 404: no (more) messages.
                return match status.as_u16() {
                    204 | 404 => Ok(()),
                    code => Err(BusError::Unavailable(
                        format!(
                            "direct get of {room} answered {code} {}",
                            msg.description.as_deref().unwrap_or("")
                        )
                        .into(),
                    )),
                };
            }
            let header = |name: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            let seq = header(SEQ).and_then(|v| v.parse::<u64>().ok());
            let (Some(seq), true) = (seq, header(SUBJECT).as_deref() == Some(subject.as_str())) else {
                return Err(BusError::Unavailable(
                    format!("direct get of {room}: an answer without its sequence or subject").into(),
                ));
            };
            let pending = header(PENDING).and_then(|v| v.parse::<u64>().ok());
            if !each(Stored {
                seq,
                pending,
                payload: msg.payload,
            }) {
                return Ok(());
            }
        }
    }

    /// Catch-up for a joiner whose `since` is older than this node's cache:
    /// the messages of `room` in `(since, upto]`, oldest first. Only the part
    /// the cache lacks is read from the stream (plus the message at `since`,
    /// which proves that nothing after it is gone), and reading stops as soon
    /// as the frames would pass `max_bytes` (encoded bytes): then, as when a
    /// message after `since` may be gone, the answer is `recovered: false`
    /// with no frames. `since` 0 (the client saw nothing) is recovered only
    /// if the room never dropped a message. The messages read are put in
    /// front of the cache as far as its caps allow, so the next joiner with
    /// the same `since` reads nothing. One read at a time per room.
    ///
    /// Errors: the stream could not be read ([`BusError::Unavailable`],
    /// [`BusError::Timeout`]).
    pub async fn catchup(&self, room: &RoomId, since: u64, upto: u64, max_bytes: usize) -> Result<Fetched, BusError> {
        let lost = |read_bytes| Fetched {
            frames: Vec::new(),
            recovered: false,
            read_bytes,
        };
        if self.is_ephemeral(room) {
            return Ok(lost(0));
        }
        let link = self.links.get(room).map(|l| l.clone());
        let _one_at_a_time = match &link {
            Some(l) => Some(l.reads.lock().await),
            None => None,
        };
        // An earlier reader may have filled the cache meanwhile.
        if let Catchup::Frames { frames, recovered } = self.rooms.catchup(room, since, upto) {
            return Ok(Fetched {
                frames,
                recovered,
                read_bytes: 0,
            });
        }
        if max_bytes == 0 {
            // Nothing could be replayed: read nothing.
            return Ok(lost(0));
        }
        let mut st = CatchupRead {
            proved: false,
            covered: since,
            read: Vec::new(),
            bytes: 0,
            read_bytes: 0,
        };
        // Live messages may push the cache's start up while this reads: then
        // read on from where the last read stopped.
        for _ in 0..4 {
            let (start, cached) = self.rooms.cache_start(room, upto).unwrap_or((upto, 0));
            let read_upto = start.min(upto);
            let budget = max_bytes.saturating_sub(cached);
            match self.read_forward(room, since, read_upto, budget, &mut st).await? {
                ReadEnd::Reached => {}
                ReadEnd::Lost | ReadEnd::OverBudget => return Ok(lost(st.read_bytes)),
            }
            if let Some(frames) = self.rooms.catchup_from_stream(room, since, upto, &st.read, read_upto) {
                let bytes: usize = frames.iter().map(Weighted::weight).sum();
                if bytes > max_bytes {
                    return Ok(lost(st.read_bytes));
                }
                return Ok(Fetched {
                    frames,
                    recovered: true,
                    read_bytes: st.read_bytes,
                });
            }
        }
        Err(BusError::Unavailable(
            format!("catch-up of {room}: the cache kept moving while it was read").into(),
        ))
    }

    /// Reads the messages of `room` after `st.covered` up to `read_upto` into
    /// `st`, within `budget` bytes of frames. The first answer (the stored
    /// message at or after `since`) decides whether anything after `since`
    /// may be gone.
    async fn read_forward(
        &self,
        room: &RoomId,
        since: u64,
        read_upto: u64,
        budget: usize,
        st: &mut CatchupRead,
    ) -> Result<ReadEnd, BusError> {
        let mut short_reads = 0;
        while st.covered < read_upto {
            let from = if st.proved { st.covered + 1 } else { since.max(1) };
            // Until the first answer proves nothing after `since` is gone,
            // ask for one message: a `since` older than the stream's history
            // then costs one message, not a batch.
            let batch = if st.proved { DIRECT_BATCH } else { 1 };
            let body = self.forward_request(room, from, batch, budget.saturating_sub(st.bytes));
            let mut end = None;
            let mut got = 0;
            self.direct(room, body, |m| {
                got += 1;
                st.read_bytes += m.payload.len();
                if !st.proved {
                    // If the message at `since` is stored, so is everything
                    // after it; and nothing lies between `since` and `since + 1`.
                    let intact = if since == 0 {
                        m.pending.is_some_and(|p| self.never_dropped(p + 1))
                    } else {
                        m.seq <= since.saturating_add(1)
                    };
                    if !intact {
                        end = Some(ReadEnd::Lost);
                        return false;
                    }
                    st.proved = true;
                    if m.seq <= since {
                        return true;
                    }
                }
                if m.seq > read_upto {
                    st.covered = read_upto;
                    return false;
                }
                if let Ok(env) = Envelope::decode(m.payload.as_ref()) {
                    let frame = encode(room, m.seq, &env);
                    st.bytes += frame.weight();
                    if st.bytes > budget {
                        end = Some(ReadEnd::OverBudget);
                        return false;
                    }
                    st.read.push((m.seq, frame));
                }
                st.covered = m.seq;
                m.seq < read_upto
            })
            .await?;
            if let Some(end) = end {
                return Ok(end);
            }
            if got == 0 {
                // Nothing at or after `since`: it is gone. Nothing after a
                // proved `since` although `read_upto` was stored: a replica
                // lags, or the messages left the stream meanwhile.
                if !st.proved || short_reads >= SHORT_READ_ATTEMPTS {
                    return Ok(ReadEnd::Lost);
                }
                short_reads += 1;
                tokio::time::sleep(Duration::from_millis(50 * u64::from(short_reads))).await;
            }
        }
        Ok(ReadEnd::Reached)
    }

    /// The newest stored message of `room` at or below offset `n`. `n` may
    /// lie past the stream's last sequence only if `first` (the first step
    /// of a page: `before` comes from the client).
    async fn last_at_or_below(&self, room: &RoomId, n: u64, first: bool) -> Result<Option<Stored>, BusError> {
        if n == 0 {
            return Ok(None);
        }
        let mut found = None;
        if n < u64::MAX {
            let body = serde_json::json!({ "multi_last": [self.store_subject(room)], "up_to_seq": n }).to_string();
            self.direct(room, body, |m| {
                found = Some(m);
                false
            })
            .await?;
            if found.is_some() || !first {
                return Ok(found);
            }
        }
        // Also "not found" when `n` is past the stream's last sequence: then
        // the room's last message is the one.
        match self
            .stream_of(room)
            .direct_get_last_for_subject(self.store_subject(room))
            .await
        {
            Ok(m) if m.sequence <= n => Ok(Some(Stored {
                seq: m.sequence,
                pending: None,
                payload: m.payload,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BusError::unavailable(e)),
        }
    }

    /// A history page beyond the cache: up to `limit` messages of `room`
    /// older than `before` (the newest if `None`), oldest first, and whether
    /// older ones remain. Reads exactly that page from the stream, newest
    /// first, one message per request, plus one message to learn `more`; a
    /// page that reaches the cache's start is put in front of the cache.
    ///
    /// Errors: the stream could not be read.
    pub async fn history(
        &self,
        room: &RoomId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Frame>, bool), BusError> {
        if self.is_ephemeral(room) {
            return Ok((Vec::new(), false));
        }
        let upto = match before {
            Some(0) => return Ok((Vec::new(), false)),
            Some(b) => b - 1,
            None => u64::MAX,
        };
        let mut page: Vec<(u64, Frame)> = Vec::new();
        let mut below = upto;
        let mut taken = 0;
        let mut oldest = None;
        // The message after a full page only answers `more`.
        let older = loop {
            let Some(m) = self.last_at_or_below(room, below, taken == 0).await? else {
                break None;
            };
            if taken == limit {
                break Some(m.seq);
            }
            taken += 1;
            oldest = Some(m.seq);
            if let Ok(env) = Envelope::decode(m.payload.as_ref()) {
                page.push((m.seq, encode(room, m.seq, &env)));
            }
            below = m.seq.saturating_sub(1);
        };
        page.reverse();
        if let (Some(oldest), Some(&(newest, _))) = (oldest, page.last()) {
            // Nothing after a stored message is gone: the page holds every
            // message of the room after the older one (or after the offset
            // before its oldest, when none is older).
            let covers_from = older.unwrap_or(oldest.saturating_sub(1));
            self.rooms.prepend(room, covers_from, &page, newest);
        }
        Ok((page.into_iter().map(|(_, f)| f).collect(), older.is_some()))
    }

    /// A client saw `offset` elsewhere; make sure this node has applied it
    /// before the client joins, so it gets no message twice.
    pub async fn sync_to(self: &Arc<Self>, room: &RoomId, offset: u64) {
        if self.is_ephemeral(room) || !self.rooms.is_live(room) || offset <= self.rooms.last_offset(room) {
            return;
        }
        // Trust the stream, not the client: an offset beyond the room's tail
        // is bogus (answered recovered:false) and must not start a repair.
        let Ok(tail) = self.last_seq(room).await else {
            return;
        };
        let offset = offset.min(tail);
        if offset <= self.rooms.last_offset(room) {
            return;
        }
        self.clone().repair_to(room.clone(), offset).await;
        // A repair that was already running reaches `offset` on its own.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.rooms.last_offset(room) < offset && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last local member left: unsubscribe after the linger unless one
    /// came back.
    pub fn room_left(self: &Arc<Self>, room: &RoomId) {
        let bus = Arc::downgrade(self);
        let room = room.clone();
        let linger = self.cfg.linger;
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let Some(bus) = bus.upgrade() else { return };
            if bus.rooms.forget_if_empty(&room) {
                // Dropping the link aborts the room task, which drops the
                // subscription (an UNSUB to NATS).
                bus.links.remove(&room);
                bus.expected.remove(&room);
                tracing::debug!(%room, "room unsubscribed");
            }
        });
    }

    /// After a reconnect: fetch what every live room missed.
    async fn resync_all(self: Arc<Self>) {
        let rooms = self.rooms.live_rooms();
        tracing::info!(
            rooms = rooms.len(),
            "checking rooms for messages missed while disconnected"
        );
        let bus = &self;
        futures_util::stream::iter(rooms)
            .for_each_concurrent(32, |(room, last)| async move {
                if bus.is_ephemeral(&room) {
                    return;
                }
                // The stream may be electing a leader right after a
                // reconnect: retry for a while before giving up.
                for attempt in 1..=REPAIR_ATTEMPTS {
                    match bus.last_seq(&room).await {
                        Ok(tail) => {
                            if tail > last {
                                bus.clone().repair_to(room, tail).await;
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%room, error = %e, attempt, "resync failed; retrying");
                            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20)))).await;
                        }
                    }
                }
                tracing::warn!(%room, "resync gave up; the next message repairs the room");
            })
            .await;
    }

    /// A new subscription reaches the other servers of the NATS cluster a
    /// moment after the server this node talks to has it: a message the
    /// stream republishes from another server in that moment is not
    /// delivered here, and without a later message nothing would reveal the
    /// gap. So the stream's tail is checked again shortly after going live.
    fn spawn_settle_check(self: &Arc<Self>, room: RoomId) {
        let bus = Arc::downgrade(self);
        tokio::spawn(async move {
            for wait in SETTLE_CHECKS {
                tokio::time::sleep(wait).await;
                let Some(bus) = bus.upgrade() else { return };
                if !bus.rooms.is_live(&room) {
                    return;
                }
                if let Ok(tail) = bus.last_seq(&room).await
                    && tail > bus.rooms.last_offset(&room)
                {
                    tracing::debug!(%room, tail, "messages sent while the subscription spread; repairing");
                    bus.repair_to(room.clone(), tail).await;
                }
            }
        });
    }

    /// Repairs `room` up to offset `tail` unless a repair is already under
    /// way (which then continues to `tail`).
    async fn repair_to(self: Arc<Self>, room: RoomId, tail: u64) {
        if let Some(gap) = self.rooms.request_repair(&room, tail) {
            self.repair(room, gap).await;
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
            tokio::spawn(async move { bus.repair_to(room, seq).await });
        }
    }
}

/// Encodes the `message` push for a stored or ephemeral message.
fn encode(room: &RoomId, offset: u64, env: &Envelope) -> Frame {
    let from_json = protocol::json_string(&env.from);
    Frame::text(protocol::message_push(room, offset, env.ts_ms, &from_json, &env.data))
}

fn stream_name(cfg: &ClusterConfig, p: u32) -> String {
    format!("{}_ROOMS_{p}", cfg.prefix.to_ascii_uppercase())
}

fn stream_config(cfg: &ClusterConfig, p: u32) -> stream::Config {
    stream::Config {
        name: stream_name(cfg, p),
        description: Some(format!("gateway rooms, partition {p} of {}", cfg.partitions)),
        subjects: vec![format!("{}.store.{p}.*", cfg.prefix)],
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: cfg.history,
        max_age: cfg.max_age,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: cfg.dedup_window,
        allow_direct: true,
        republish: Some(stream::Republish {
            source: format!("{}.store.{p}.*", cfg.prefix),
            destination: format!("{}.room.{{{{wildcard(1)}}}}", cfg.prefix),
            headers_only: false,
        }),
        metadata: HashMap::from([("gateway.partitions".to_string(), cfg.partitions.to_string())]),
        ..Default::default()
    }
}

/// Creates the stream of partition `p`, or checks that an existing one keeps
/// at least what the gateway promises. Never shrinks or rewrites a stream.
async fn ensure_stream(js: &jetstream::Context, cfg: &ClusterConfig, p: u32) -> Result<stream::Stream, ClusterError> {
    let name = stream_name(cfg, p);
    let wrap = |e: Box<dyn std::error::Error + Send + Sync>| ClusterError::Stream {
        stream: name.clone(),
        source: e,
    };
    // Several nodes may start at once: a create that loses the race (or times
    // out while the meta leader is busy) is retried as a lookup.
    let mut attempt = 0;
    let mut stream = loop {
        attempt += 1;
        match js.get_stream(&name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| wrap(Box::new(e)))?;
                check_stream(&name, &info.config, cfg)?;
                break s;
            }
            Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                tracing::info!(stream = %name, replicas = cfg.replicas, "creating room stream");
                match js.create_stream(stream_config(cfg, p)).await {
                    Ok(s) => break s,
                    Err(e) if attempt < 5 => {
                        tracing::debug!(stream = %name, error = %e, "stream create failed; looking it up again");
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                    Err(e) => return Err(wrap(Box::new(e))),
                }
            }
            Err(e) if attempt < 5 => {
                tracing::debug!(stream = %name, error = %e, "stream lookup failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(wrap(Box::new(e))),
        }
    };
    // A replicated stream takes a moment to elect its leader; the node is not
    // ready before its streams can take writes.
    let deadline = Instant::now() + cfg.connect_timeout;
    loop {
        let info = stream.get_info().await.map_err(|e| wrap(Box::new(e)))?;
        let has_leader = info
            .cluster
            .as_ref()
            .is_none_or(|c| c.leader.is_some() || c.name.is_none());
        if has_leader || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stream.info().await;
    Ok(stream)
}

/// Refuses a stream whose limits would drop messages the gateway promises
/// to keep (the report's silent JetStream loss).
pub fn check_stream(name: &str, have: &stream::Config, want: &ClusterConfig) -> Result<(), ClusterError> {
    let unsafe_ = |limit: &'static str, detail: String| ClusterError::Unsafe {
        stream: name.to_string(),
        limit,
        detail,
    };
    if have.storage != stream::StorageType::File {
        return Err(unsafe_("storage", "memory storage loses everything on restart".into()));
    }
    // A stream-wide limit with discard-old evicts other rooms' history.
    if have.discard == stream::DiscardPolicy::Old {
        for (limit, value) in [("max_msgs", have.max_messages), ("max_bytes", have.max_bytes)] {
            if value > 0 {
                return Err(unsafe_(
                    limit,
                    format!("{limit}={value} with discard=old evicts other rooms' history"),
                ));
            }
        }
    }
    if have.max_messages_per_subject > 0 && (want.history < 0 || have.max_messages_per_subject < want.history) {
        return Err(unsafe_(
            "max_msgs_per_subject",
            format!(
                "{} < the room history of {}",
                have.max_messages_per_subject, want.history
            ),
        ));
    }
    if !have.max_age.is_zero() && (want.max_age.is_zero() || have.max_age < want.max_age) {
        return Err(unsafe_(
            "max_age",
            format!("{:?} is shorter than the configured {:?}", have.max_age, want.max_age),
        ));
    }
    if have.num_replicas < want.replicas {
        return Err(unsafe_(
            "replicas",
            format!("{} < the configured {}", have.num_replicas, want.replicas),
        ));
    }
    if have.duplicate_window < want.dedup_window {
        return Err(unsafe_(
            "duplicate_window",
            format!(
                "{:?} < the publish dedup window {:?}",
                have.duplicate_window, want.dedup_window
            ),
        ));
    }
    let partitions = have.metadata.get("gateway.partitions");
    if partitions.is_some_and(|p| *p != want.partitions.to_string()) {
        return Err(unsafe_(
            "partitions",
            format!(
                "made for {} partitions, the gateway has {}",
                partitions.cloned().unwrap_or_default(),
                want.partitions
            ),
        ));
    }
    if have.republish.is_none() {
        return Err(unsafe_(
            "republish",
            "no republish to the rooms' fan-out subjects".into(),
        ));
    }
    Ok(())
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
        }
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
