//! One WebSocket connection: its task, its session state and its outbox.
//!
//! Owns everything per connection. The task races two futures:
//! - the **reader** decodes client frames (`ws`), checks rights and limits,
//!   calls the room index and the bus, queues replies (and pings, from its
//!   one deadline timer) in the outbox;
//! - the **writer** drains the outbox in batches, one vectored write each,
//!   whenever the outbox makes the task its writer: for the connection's own
//!   frames, and for room messages a flusher could not write because the
//!   socket was full; it notices a client that stopped reading. Room messages
//!   to a socket with room are written by a flusher (`fanout_tree::flush`)
//!   without waking this task.
//!
//! Whichever ends first decides the [`CloseReason`]; cleanup (leaving every
//! room, the final close frame) always runs, bounded in time.
//!
//! Replies and pushes share one queue, so a client sees them in the order the
//! node produced them. A `subscribe` holds the outbox while it joins rooms, so
//! its reply precedes the catch-up and live messages of those rooms.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fanout_tree::{DirectWrite, Drained, Outbox, OutboxLimits, Weighted};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::auth::{self, Identity};
use crate::bus::{BusError, Fetched, Outgoing};
use crate::error::{CloseReason, ErrorCode, ProtoError};
use crate::limits::{Admit, ConnLimits, RateLimited, Strikes};
use crate::protobuf;
use crate::protocol::{self, Command, SubscribeEntry};
use crate::rooms::{Activity, Catchup, ConnId, ConnOutbox, Frame, HistoryPage, Member, RoomError, RoomId, Transition};
use crate::server::Node;
use crate::ws::{self, Incoming, ReadError, Reader};

/// Write coalescing window for busy connections.
const COALESCE: Duration = Duration::from_millis(2);
/// Batches this large are written without waiting.
const COALESCE_BELOW: usize = 64;
/// How long the client's answering close frame is waited for (while its
/// unread frames are discarded).
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// How long the final close frame may take to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// The same for a slow consumer: its close frame waits behind what its socket
/// already holds, until the client reads again (memory stays bounded: the
/// outbox is closed and the socket buffer is the kernel's).
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Longest publish `key`.
const MAX_KEY_LEN: usize = 256;
/// Window over which bad frames are counted.
const BAD_FRAME_WINDOW: Duration = Duration::from_secs(60);
/// Share of the outbox a catch-up or history page leaves free for the live
/// messages that may arrive while it is queued (1/8 of the caps).
const OUTBOX_RESERVE_SHIFT: u32 = 3;

/// What the upgrade request settled about a connection.
pub struct Upgrade {
    pub peer: SocketAddr,
    /// From admission control; held until the connection ends.
    pub admit: Admit,
    /// Set when the request carried a verified `Authorization: Bearer`
    /// token: then no `connect` frame is needed.
    pub identity: Option<Identity>,
    /// `gw.v1.proto` (binary frames) instead of `gw.v1.json`.
    pub proto: bool,
}

/// Runs one upgraded connection to its end, given the two halves of its
/// socket, and `sink` when a flusher may write room messages to the socket
/// directly.
pub async fn run<R, W>(
    node: Arc<Node>,
    mut reader: Reader<R>,
    mut writer: W,
    sink: Option<Arc<dyn DirectWrite>>,
    upgrade: Upgrade,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Upgrade {
        peer,
        admit,
        identity,
        proto,
    } = upgrade;
    let cfg = &node.cfg;
    let id = node.next_conn_id();
    let _count = node.count_conn();
    let limits = OutboxLimits {
        max_bytes: cfg.outbox_max_bytes,
        max_frames: cfg.outbox_max_frames,
    };
    let shard = node.rooms.flushers().shard_for(id.0);
    let outbox: ConnOutbox = Arc::new(Outbox::with_sink(limits, sink, shard));
    let mut batch = VecDeque::new();

    if node.conns_active() > cfg.max_connections {
        tracing::debug!(%peer, "refusing connection: node is full");
        finish(
            &mut writer,
            &mut reader,
            &outbox,
            &mut batch,
            CloseReason::TooManyConnections,
        )
        .await;
        node.metrics.closed(CloseReason::TooManyConnections);
        return;
    }

    // Created by the first notify-mode subscription: most connections never need it.
    let activity = OnceLock::new();
    let mut session = Session::new(node.clone(), id, outbox.clone(), &activity, admit);
    session.proto = proto;
    let reason = {
        let reading = session.read_loop(&mut reader, identity);
        let times = WriterTimes {
            write_timeout: cfg.write_timeout,
            activity_interval: cfg.activity_interval,
            proto,
        };
        let writing = write_loop(&mut writer, &outbox, &activity, &mut batch, times);
        let drain = async {
            node.draining().await;
            // Spread the 1012s so clients do not all reconnect at once.
            let spread = cfg.drain_spread.min(cfg.drain_timeout / 2);
            if !spread.is_zero() {
                sleep(spread.mul_f64(rand::random::<f64>())).await;
            }
        };
        tokio::select! {
            r = reading => r,
            r = writing => r,
            () = drain => CloseReason::NodeDraining,
        }
    };
    session.leave_all();
    if reason == CloseReason::SlowConsumer {
        node.metrics.slow_closes_total.increment(1);
        tracing::debug!(conn = id.0, %peer, "closing slow consumer");
    }
    node.record_outbox_peak(outbox.peak_bytes());
    finish(&mut writer, &mut reader, &outbox, &mut batch, reason).await;
    node.metrics.closed(reason);
}

/// Sends what is still queued (unless the client is the reason it could not be
/// sent) and the close frame, then completes the closing handshake, within
/// [`CLOSE_GRACE`].
///
/// Reading until the client's own close frame matters: dropping a socket that
/// still holds unread client frames (a flooder's backlog) makes the kernel
/// reset the connection, and the reset destroys the close frame we just sent.
async fn finish<R, W>(
    writer: &mut W,
    reader: &mut Reader<R>,
    outbox: &ConnOutbox,
    batch: &mut VecDeque<Frame>,
    reason: CloseReason,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    outbox.close();
    let Some(code) = reason.code() else {
        return;
    };
    let work = async {
        let client_closed = matches!(reason, CloseReason::ClientClosed(_));
        // Takes the queue from a flusher, if one was writing it.
        outbox.try_drain(batch);
        if reason == CloseReason::SlowConsumer || client_closed {
            // Only the rest of a frame already partly on the wire: the close
            // frame must not land inside it.
            let partial = batch.front().is_some_and(Frame::is_partly_written);
            batch.truncate(usize::from(partial));
        }
        ws::write_all(writer, batch).await?;
        ws::write_frame(writer, Frame::close(code, reason.text())).await?;
        if !client_closed {
            // Bounded on its own: a client that never answers must not hold a drain.
            let _ = timeout(CLOSE_LINGER, async {
                while let Ok(msg) = reader.next().await {
                    if matches!(msg, Incoming::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        tokio::io::AsyncWriteExt::shutdown(writer).await
    };
    let grace = if reason == CloseReason::SlowConsumer {
        SLOW_CLOSE_GRACE
    } else {
        CLOSE_GRACE
    };
    let _ = timeout(grace, work).await;
}

/// Timing of the writer.
#[derive(Debug, Clone, Copy)]
struct WriterTimes {
    write_timeout: Duration,
    /// At most one `activity` push per room per this interval.
    activity_interval: Duration,
    /// The connection speaks `gw.v1.proto`.
    proto: bool,
}

/// The only writer of the socket: drains the outbox in batches, one
/// vectored write per batch, and notices a client that stopped reading.
async fn write_loop<W>(
    writer: &mut W,
    outbox: &ConnOutbox,
    activity: &OnceLock<Arc<Activity>>,
    batch: &mut VecDeque<Frame>,
    times: WriterTimes,
) -> CloseReason
where
    W: AsyncWrite + Unpin,
{
    let WriterTimes {
        write_timeout,
        activity_interval,
        proto,
    } = times;
    let mut last_write: Option<Instant> = None;
    // Notify-mode counts are flushed one interval after the first message of
    // a burst (trailing edge: a burst becomes one push per room); an idle
    // connection arms no timer at all.
    loop {
        tokio::select! {
            d = outbox.drain(batch) => match d {
                Drained::Frames => {
                    // A connection written to moments ago is busy: wait out the
                    // rest of a short window so one write(2) carries several
                    // frames. A quiet connection writes at once.
                    if let Some(at) = last_write
                        && batch.len() < COALESCE_BELOW
                        && at.elapsed() < COALESCE
                        && !batch.iter().any(Frame::is_reply)
                    {
                        sleep_until(at + COALESCE).await;
                        outbox.try_drain(batch);
                    }
                }
                Drained::Overflowed => return CloseReason::SlowConsumer,
                Drained::Closed => return CloseReason::ClientGone,
            },
            a = async {
                // Boxed and only for connections with notify-mode rooms (the
                // subscribe reply that follows the first one starts a new
                // round of this loop, which sees it). The deadline is kept by
                // `activity`, so a restart of this branch (other frames won
                // the select) does not postpone it.
                match activity.get() {
                    Some(a) => {
                        Box::pin(async {
                            let first = a.pending().await;
                            sleep_until(first + activity_interval).await;
                        })
                        .await;
                        a
                    }
                    None => std::future::pending().await,
                }
            } => {
                // Through the outbox: whoever writes it now (this task or a
                // flusher) writes these too, in order. A full outbox shows up
                // as overflowed on the next drain.
                for (room, offset, count) in a.take() {
                    let push = Frame::text(protocol::activity_push(&room, offset, count));
                    let _ = outbox.try_push(if proto { push.to_proto() } else { push });
                }
                continue;
            },
        }
        last_write = Some(Instant::now());
        let last_batch = batch.len();
        // A client that stops reading leaves this write pending; notice it
        // through the overflowing outbox or the write timeout.
        tokio::select! {
            r = ws::write_all(writer, batch) => {
                if r.is_err() {
                    return CloseReason::ClientGone;
                }
            }
            () = outbox.overflowed() => return CloseReason::SlowConsumer,
            () = sleep(write_timeout) => return CloseReason::SlowConsumer,
        }
        // A quiet connection keeps no queue memory between writes (a busy
        // one, whose batches carry several frames, keeps its buffer).
        if batch.capacity() > 1024 || last_batch < 4 {
            *batch = VecDeque::new();
        }
    }
}

/// A room this connection is subscribed to, and by which grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RoomSub {
    /// Subscribed through a room token: the grant is the token's, so a
    /// refresh of the connection token does not revoke it, and it ends when
    /// the room token expires.
    by_token: bool,
    /// Publishing granted by the room token (beyond the connection's grants).
    token_pub: bool,
    /// When the room token's grant ends: its `exp` plus the leeway.
    expires: Option<Instant>,
}

impl RoomSub {
    /// Subscribed under the connection token's grants.
    const BY_CONNECTION: RoomSub = RoomSub {
        by_token: false,
        token_pub: false,
        expires: None,
    };

    /// Whether the room token's grant still holds at `now` (always true for
    /// a room the connection token grants).
    fn grant_holds(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| now < e)
    }

    /// Whether the room token lets the connection publish at `now`.
    fn may_publish(&self, now: Instant) -> bool {
        self.by_token && self.token_pub && self.grant_holds(now)
    }
}

struct Session<'a> {
    node: Arc<Node>,
    id: ConnId,
    outbox: ConnOutbox,
    /// Pending `activity` counts of this connection's notify-mode rooms.
    activity: &'a OnceLock<Arc<Activity>>,
    identity: Option<Identity>,
    /// Speaks `gw.v1.proto` (binary frames) instead of `gw.v1.json`.
    proto: bool,
    /// A pre-authenticated connection may still send `connect` first.
    connect_allowed: bool,
    /// `sub` as a JSON string literal, encoded once for every message push.
    from_json: String,
    rooms: HashMap<RoomId, RoomSub>,
    /// Room-token grants by expiry: the reader's deadline includes the first.
    /// Boxed on first use: most connections hold no room token, and an idle
    /// connection's task stays small.
    #[allow(clippy::box_collection)]
    grant_expiry: Option<Box<BTreeSet<(Instant, RoomId)>>>,
    /// When the connection token's grant ends: its `exp` plus the leeway.
    expires_at: Option<Instant>,
    bad_frames: Strikes,
    limits: ConnLimits,
}

/// Leaves every room however the task ends, a panic included: a member whose
/// task is gone must not stay in a room and keep receiving its messages.
impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.leave_all();
    }
}

impl<'a> Session<'a> {
    fn new(
        node: Arc<Node>,
        id: ConnId,
        outbox: ConnOutbox,
        activity: &'a OnceLock<Arc<Activity>>,
        admit: Admit,
    ) -> Self {
        let bad_frames = Strikes::new(node.cfg.max_bad_frames, BAD_FRAME_WINDOW, Instant::now());
        let limits = node.limits.conn(admit);
        Self {
            node,
            id,
            outbox,
            activity,
            identity: None,
            proto: false,
            connect_allowed: false,
            from_json: String::new(),
            rooms: HashMap::new(),
            grant_expiry: None,
            expires_at: None,
            bad_frames,
            limits,
        }
    }

    fn forget_activity(&self, room: &RoomId) {
        if let Some(a) = self.activity.get() {
            a.forget(room);
        }
    }

    fn leave_all(&mut self) {
        for room in self.rooms.keys() {
            leave(&self.node, room, self.id);
        }
        self.rooms.clear();
        self.grant_expiry = None;
    }

    /// Records `room` as subscribed under `sub`, replacing (and un-timing)
    /// an earlier grant of the same room.
    fn set_room(&mut self, room: &RoomId, sub: RoomSub) {
        if let Some(old) = self.rooms.insert(room.clone(), sub)
            && let Some(at) = old.expires
        {
            self.forget_expiry(at, room);
        }
        if let Some(at) = sub.expires {
            self.grant_expiry.get_or_insert_default().insert((at, room.clone()));
        }
    }

    /// The earliest room-token expiry, if any.
    fn first_grant_expiry(&self) -> Option<Instant> {
        self.grant_expiry.as_ref()?.first().map(|(at, _)| *at)
    }

    fn forget_expiry(&mut self, at: Instant, room: &RoomId) {
        if let Some(g) = &mut self.grant_expiry {
            g.remove(&(at, room.clone()));
            if g.is_empty() {
                self.grant_expiry = None;
            }
        }
    }

    /// Leaves `room` if subscribed: membership, grant timer, activity count.
    fn drop_room(&mut self, room: &RoomId) -> bool {
        let Some(sub) = self.rooms.remove(room) else {
            return false;
        };
        if let Some(at) = sub.expires {
            self.forget_expiry(at, room);
        }
        leave(&self.node, room, self.id);
        self.forget_activity(room);
        true
    }

    /// Ends the room-token grants that expired by `now`: a room the
    /// connection token does not grant is left with an `unsubscribed` push;
    /// one it does grant stays, without the token's extra rights.
    fn expire_room_grants(&mut self, now: Instant) -> Result<(), CloseReason> {
        while self.first_grant_expiry().is_some_and(|at| at <= now) {
            let Some((_, room)) = self.grant_expiry.as_mut().and_then(|g| g.pop_first()) else {
                break;
            };
            if self.identity().grants.can_subscribe(room.as_str()) {
                self.rooms.insert(room, RoomSub::BY_CONNECTION);
                continue;
            }
            self.drop_room(&room);
            self.send(protocol::unsubscribed_push(&room, "the room token expired"))?;
        }
        Ok(())
    }

    /// Queues a reply (or a push of this connection's own); a full outbox
    /// ends the connection as slow.
    fn send(&self, text: String) -> Result<(), CloseReason> {
        self.push(self.out(text))
    }

    /// A frame built as JSON, in this connection's sub-protocol.
    fn out(&self, text: String) -> Frame {
        if self.proto {
            Frame::binary_reply(&protobuf::server_frame(text.as_bytes()))
        } else {
            Frame::reply(text)
        }
    }

    fn parse(&self, frame: &Bytes) -> protocol::Parsed {
        if self.proto {
            protobuf::parse(frame)
        } else {
            protocol::parse(frame)
        }
    }

    fn push(&self, frame: Frame) -> Result<(), CloseReason> {
        self.outbox.try_push(frame).map_err(|_| CloseReason::SlowConsumer)
    }

    fn reply_err(&self, id: Option<u32>, err: &ProtoError) -> Result<(), CloseReason> {
        self.send(protocol::error_reply(id, err))
    }

    fn reply_ok(&self, id: Option<u32>, body: &str) -> Result<(), CloseReason> {
        match id {
            Some(id) => self.send(protocol::ok_reply(id, body)),
            None => Ok(()),
        }
    }

    /// Counts a bad frame; too many within the window is a policy violation.
    fn bad_frame(&mut self, id: Option<u32>, err: &ProtoError) -> Result<(), CloseReason> {
        self.node.metrics.bad_frames_total.increment(1);
        let too_many = self.bad_frames.hit(Instant::now());
        self.reply_err(id, err)?;
        if too_many {
            return Err(CloseReason::PolicyViolation);
        }
        Ok(())
    }

    /// Answers a command over a limit with `rate_limited`; too many of those
    /// within the window is a policy violation.
    fn rate_limited(&mut self, id: Option<u32>, r: RateLimited) -> Result<(), CloseReason> {
        self.node.limits.record(&r);
        self.reply_err(id, &ProtoError::rate_limited(r.retry_after_ms()))?;
        if self.limits.strike(&r) {
            tracing::debug!(
                conn = self.id.0,
                limit = r.limit.label(),
                "closing for repeated rate-limit violations"
            );
            return Err(CloseReason::PolicyViolation);
        }
        Ok(())
    }

    /// `preauth` is the identity from the upgrade's `Authorization` header.
    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
        preauth: Option<Identity>,
    ) -> CloseReason {
        if let Err(reason) = Box::pin(self.authenticate(reader, preauth)).await {
            return reason;
        }
        self.limits.handshake_done();
        let idle = self.node.cfg.idle_timeout;
        let ping_interval = self.node.cfg.ping_interval;
        let mut idle_at = Instant::now() + idle;
        let mut ping_at = Instant::now() + ping_interval;
        loop {
            // One timer for the idle, token-expiry and ping deadlines (memory
            // per idle connection): pings are queued by the reader.
            // Every grant is enforced at its expiry: the connection token's
            // and the first room token's are deadlines of this one timer.
            let mut deadline = idle_at.min(ping_at);
            if let Some(e) = self.expires_at {
                deadline = deadline.min(e);
            }
            if let Some(e) = self.first_grant_expiry() {
                deadline = deadline.min(e);
            }
            let msg = match tokio::time::timeout_at(deadline, reader.next()).await {
                Err(_) => {
                    let now = Instant::now();
                    if self.expires_at.is_some_and(|e| e <= now) {
                        return CloseReason::TokenExpired;
                    }
                    if idle_at <= now {
                        return CloseReason::IdleTimeout;
                    }
                    if let Err(reason) = self.expire_room_grants(now) {
                        return reason;
                    }
                    if ping_at <= now {
                        if let Err(reason) = self.push(Frame::ping()) {
                            return reason;
                        }
                        ping_at = now + ping_interval;
                    }
                    continue;
                }
                Ok(Err(e)) => return read_error_reason(&e),
                Ok(Ok(m)) => m,
            };
            idle_at = Instant::now() + idle;
            let result = match msg {
                Incoming::Text(frame) if !self.proto => self.command(frame).await,
                Incoming::Binary(frame) if self.proto => self.command(frame).await,
                Incoming::Text(_) => self.bad_frame(
                    None,
                    &ProtoError::bad_request("text frames are not accepted on gw.v1.proto"),
                ),
                Incoming::Binary(_) => self.bad_frame(
                    None,
                    &ProtoError::bad_request("binary frames are not accepted on gw.v1.json"),
                ),
                Incoming::Ping(payload) => self.push(Frame::pong(&payload)),
                Incoming::Pong => Ok(()),
                Incoming::Close(code) => return CloseReason::ClientClosed(code),
            };
            if let Err(reason) = result {
                return reason;
            }
        }
    }

    async fn command(&mut self, frame: Bytes) -> Result<(), CloseReason> {
        match self.limits.check_bytes(frame.len()) {
            // Boxed: a command's state lives on the heap only while it
            // runs, so an idle connection stays small.
            Ok(()) => Box::pin(self.handle(frame)).await,
            Err(r) => self.rate_limited(self.parse(&frame).id, r),
        }
    }

    async fn authenticate<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
        preauth: Option<Identity>,
    ) -> Result<(), CloseReason> {
        if let Some(identity) = preauth {
            self.accept(identity, None)?;
            self.connect_allowed = true;
            return Ok(());
        }
        let deadline = Instant::now() + self.node.cfg.auth_timeout;
        let unauthorized = |msg: &'static str| ProtoError::new(ErrorCode::Unauthorized, msg);
        let shed = |this: &mut Self| {
            this.reply_err(
                None,
                &unauthorized("closed to make room: no connect while the node was full"),
            )?;
            this.node.metrics.auth_failed("shed");
            Err(CloseReason::Unauthorized)
        };
        loop {
            // A full handshake table may shed this connection while it is silent.
            let waited = tokio::select! {
                biased;
                () = self.limits.handshake_shed() => None,
                r = tokio::time::timeout_at(deadline, reader.next()) => Some(r),
            };
            let Some(waited) = waited else {
                return shed(self);
            };
            let msg = match waited {
                Err(_) => {
                    self.reply_err(None, &unauthorized("no connect within the auth timeout"))?;
                    self.node.metrics.auth_failed("timeout");
                    return Err(CloseReason::Unauthorized);
                }
                Ok(Err(e)) => return Err(read_error_reason(&e)),
                Ok(Ok(m)) => m,
            };
            let text = match msg {
                Incoming::Ping(payload) => {
                    self.push(Frame::pong(&payload))?;
                    continue;
                }
                Incoming::Pong => continue,
                Incoming::Close(code) => return Err(CloseReason::ClientClosed(code)),
                Incoming::Text(_) | Incoming::Binary(_) if !self.limits.handshake_spoke() => return shed(self),
                Incoming::Text(t) if !self.proto => t,
                Incoming::Binary(b) if self.proto => b,
                Incoming::Text(_) | Incoming::Binary(_) => {
                    self.reply_err(None, &unauthorized("the first frame must be connect"))?;
                    return Err(CloseReason::Unauthorized);
                }
            };
            let parsed = self.parse(&text);
            let token = match parsed.command {
                Ok(Command::Connect { token }) => token,
                _ => {
                    self.reply_err(parsed.id, &unauthorized("the first frame must be connect"))?;
                    self.node.metrics.auth_failed("no_connect");
                    return Err(CloseReason::Unauthorized);
                }
            };
            return self.connect(parsed.id, &token).await;
        }
    }

    /// Verifies a `connect` token: accepted, or error `unauthorized` and 4001.
    async fn connect(&mut self, id: Option<u32>, token: &str) -> Result<(), CloseReason> {
        match self.node.verifier.verify_connect(token).await {
            Ok(identity) => self.accept(identity, id),
            Err(e) => {
                self.node.metrics.auth_failed(e.label());
                self.reply_err(id, &ProtoError::new(ErrorCode::Unauthorized, e.to_string()))?;
                Err(CloseReason::Unauthorized)
            }
        }
    }

    fn accept(&mut self, identity: Identity, id: Option<u32>) -> Result<(), CloseReason> {
        self.from_json = protocol::json_string(&identity.sub);
        let expires_in = self.set_expiry(identity.exp);
        // `max_frame_bytes` (an extension): a client splits a `subscribe`
        // that would not fit one frame.
        let body = format!(
            "{{\"client\":{},\"node\":{},\"expires_in\":{},\"max_frame_bytes\":{}}}",
            protocol::json_string(&self.client_id()),
            protocol::json_string(&self.node.cfg.node_id),
            expires_in.map_or_else(|| "null".to_string(), |s| s.to_string()),
            self.node.cfg.max_frame_bytes
        );
        self.identity = Some(identity);
        self.reply_ok(id, &body)
    }

    fn client_id(&self) -> String {
        format!("{}-{:x}", self.node.cfg.node_id, self.id.0)
    }

    /// Sets the expiry timer (one per connection, reset by `refresh`) to
    /// `exp` plus the leeway the token was verified with, so a token accepted
    /// inside the leeway is not closed the moment it is accepted; returns
    /// whole seconds until `exp` itself (None without `exp`).
    fn set_expiry(&mut self, exp: Option<u64>) -> Option<u64> {
        let Some(exp) = exp else {
            self.expires_at = None;
            return None;
        };
        self.expires_at = Some(auth::deadline(exp, self.node.verifier.leeway()));
        Some(auth::until(exp, Duration::ZERO).as_secs())
    }

    async fn handle(&mut self, frame: Bytes) -> Result<(), CloseReason> {
        let parsed = self.parse(&frame);
        let id = parsed.id;
        let command = match parsed.command {
            Ok(c) => c,
            Err(e) => return self.bad_frame(id, &e),
        };
        let first = std::mem::take(&mut self.connect_allowed);
        match command {
            Command::Connect { token } if first => self.connect(id, &token).await,
            Command::Connect { .. } => self.bad_frame(id, &ProtoError::bad_request("already connected")),
            Command::Subscribe { rooms } => {
                // Fetch rotated keys for room tokens before the outbox is held.
                for token in rooms.iter().filter_map(|e| e.token.as_deref()) {
                    self.node.verifier.prepare(token).await;
                }
                Box::pin(self.subscribe(id, rooms)).await
            }
            Command::Unsubscribe { rooms } => {
                for name in rooms {
                    if let Some(room) = RoomId::parse(&name) {
                        self.drop_room(&room);
                    }
                }
                self.reply_ok(id, "{}")
            }
            Command::Publish { room, data, key } => Box::pin(self.publish(id, &room, &data, key.as_deref())).await,
            Command::History { room, limit, before } => Box::pin(self.history(id, &room, limit, before)).await,
            Command::Refresh { token } => Box::pin(self.refresh(id, &token)).await,
            Command::Ping => {
                self.send(protocol::PONG.to_string())?;
                self.reply_ok(id, "{}")
            }
        }
    }

    fn identity(&self) -> &Identity {
        self.identity.as_ref().expect("commands run only after connect")
    }

    /// Joins every room of one `subscribe` frame. The outbox is held from
    /// the first join until the reply is queued, so the reply comes first,
    /// then each room's catch-up, then live messages.
    async fn subscribe(&mut self, id: Option<u32>, entries: Vec<SubscribeEntry>) -> Result<(), CloseReason> {
        if let Err(r) = self.limits.check_subscribe(entries.len()) {
            return self.rate_limited(id, r);
        }
        let started = std::time::Instant::now();
        let node = self.node.clone();
        self.outbox.hold();
        // Phase 1: check and register every room.
        let mut slots: Vec<Result<Slot, ProtoError>> = Vec::with_capacity(entries.len());
        for entry in &entries {
            slots.push(self.join_one(entry).await);
        }
        // Phase 2 (cluster mode): rooms new to this node are subscribed on the
        // bus, concurrently; each room once however many joiners wait.
        let cold: Vec<(usize, RoomId)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Ok(s) if s.at.is_none() => Some((i, s.room.clone())),
                _ => None,
            })
            .collect();
        if !cold.is_empty() {
            let results: Vec<(usize, Result<(), BusError>)> = futures_util::stream::iter(cold)
                .map(|(i, room)| {
                    let node = &node;
                    async move { (i, node.bus.ensure_live(&room).await) }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            for (i, r) in results {
                let slot = std::mem::replace(&mut slots[i], Err(ProtoError::bad_request("")));
                slots[i] = match (slot, r) {
                    (Ok(mut s), Ok(())) => {
                        let upto = node.rooms.live_from(&s.room).unwrap_or(0);
                        s.at = Some((upto, s.since.map(|since| node.rooms.catchup(&s.room, since, upto))));
                        Ok(s)
                    }
                    (Ok(s), Err(e)) => {
                        tracing::debug!(room = %s.room, error = %e, "room could not be made live");
                        self.drop_room(&s.room);
                        Err(bus_error(&e))
                    }
                    (Err(e), _) => Err(e),
                };
            }
        }
        // The catch-up budget: what one subscribe may replay, what the
        // connection's history budget has left, and what its outbox can
        // still take next to the reply.
        let reply_bytes: usize = entries
            .iter()
            .map(|e| e.room.as_deref().map_or(0, str::len) + 128)
            .sum();
        let (free_frames, free_bytes) = room_for(&self.outbox);
        let mut budget = CatchupBudget {
            bytes: node
                .cfg
                .catchup_max_bytes
                .min(self.limits.replay_available())
                .min(free_bytes.saturating_sub(reply_bytes)),
            frames: free_frames.saturating_sub(1),
        };
        let budget_bytes = budget.bytes;
        // Phase 3: catch-up older than this node's cache, from the stream.
        let backend: Vec<(usize, RoomId, u64, u64)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Ok(Slot {
                    room,
                    since,
                    at: Some((upto, Some(Catchup::NeedsBackend))),
                }) => Some((i, room.clone(), since.unwrap_or(0), *upto)),
                _ => None,
            })
            .collect();
        let mut fetched: HashMap<usize, Result<Fetched, BusError>> = HashMap::new();
        // One read at a time, each capped by what the earlier ones left: a
        // frame naming the same old room many times reads it once at most.
        let mut read_left = budget.bytes.saturating_sub(cached_catchup_bytes(&slots));
        let mut read_bytes = 0;
        for (i, room, since, upto) in backend {
            let r = node.bus.catchup(&room, since, upto, read_left).await;
            if let Ok(f) = &r {
                read_bytes += f.read_bytes;
                read_left = read_left.saturating_sub(f.read_bytes);
            }
            fetched.insert(i, r);
        }
        // Phase 4: the reply, and the catch-up within the budget.
        let mut body = String::with_capacity(16 + entries.len() * 40);
        body.push_str("{\"rooms\":[");
        let mut catchup = Vec::new();
        for (i, slot) in slots.into_iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let slot = slot.and_then(|s| {
                let (offset, c) = s.at.unwrap_or((0, None));
                let recovered = match c {
                    None => None,
                    Some(Catchup::Frames { frames, recovered }) => {
                        Some(take_within(&mut catchup, frames, recovered, &mut budget))
                    }
                    Some(Catchup::NeedsBackend) => match fetched.remove(&i) {
                        Some(Ok(f)) => Some(take_within(&mut catchup, f.frames, f.recovered, &mut budget)),
                        Some(Err(e)) => return Err(bus_error(&e)),
                        None => Some(false),
                    },
                };
                Ok((s.room, offset, recovered))
            });
            match slot {
                Ok((room, offset, recovered)) => {
                    let _ = write!(body, "{{\"room\":\"{room}\",\"offset\":{offset}");
                    if let Some(r) = recovered {
                        let _ = write!(body, ",\"recovered\":{r}");
                    }
                    body.push('}');
                }
                Err(err) => {
                    let name = entries[i].room.as_deref().unwrap_or("");
                    let _ = write!(
                        body,
                        "{{\"room\":{},\"error\":",
                        protocol::json_string(protocol::truncate(name, 200))
                    );
                    protocol::write_error(&mut body, &err);
                    body.push('}');
                }
            }
        }
        body.push_str("]}");
        // Replayed bytes, or bytes read from the stream if more (a read
        // whose room then did not fit still cost the node).
        self.limits.spend_replay((budget_bytes - budget.bytes).max(read_bytes));
        let reply = id.map(|id| self.out(protocol::ok_reply(id, &body)));
        if self.proto {
            catchup = catchup.iter().map(Frame::to_proto).collect();
        }
        node.metrics.subscribe_rooms.record(entries.len() as f64);
        tracing::trace!(conn = self.id.0, rooms = entries.len(), elapsed = ?started.elapsed(), "subscribe");
        self.outbox
            .release(reply, catchup)
            .map_err(|_| CloseReason::SlowConsumer)
    }

    async fn join_one(&mut self, entry: &SubscribeEntry) -> Result<Slot, ProtoError> {
        let name = entry.room.as_deref().unwrap_or("");
        let room = RoomId::parse(name).ok_or_else(|| ProtoError::bad_request("invalid room name"))?;
        let notify = match entry.mode.as_deref() {
            None | Some("full") => false,
            Some("notify") => true,
            Some(_) => return Err(ProtoError::bad_request("mode must be full or notify")),
        };
        let mut sub = RoomSub::BY_CONNECTION;
        if let Some(token) = &entry.token {
            let grant = self
                .node
                .verifier
                .verify_room(token, &self.identity().sub, room.as_str())
                .map_err(|e| {
                    self.node.metrics.auth_failed(e.label());
                    ProtoError::forbidden(format!("room token refused: {e}"))
                })?;
            // Subscribing again with a fresh room token renews the grant.
            sub = RoomSub {
                by_token: true,
                token_pub: grant.publish,
                expires: grant.exp.map(|exp| auth::deadline(exp, self.node.verifier.leeway())),
            };
        } else if !self.identity().grants.can_subscribe(room.as_str()) {
            return Err(ProtoError::forbidden("the token does not grant this room"));
        }
        let already = self.rooms.contains_key(&room);
        if !already && self.rooms.len() >= self.node.cfg.max_rooms_per_conn {
            return Err(ProtoError::new(
                ErrorCode::LimitExceeded,
                format!("at most {} rooms per connection", self.node.cfg.max_rooms_per_conn),
            ));
        }
        // Notify mode pushes no messages: `since` has nothing to replay.
        let since = if notify { None } else { entry.since };
        if let Some(since) = since {
            // The client may have seen newer messages on another node.
            self.node.bus.sync_to(&room, since).await;
        }
        let member = if notify {
            Member::Notify(self.activity.get_or_init(Arc::default))
        } else {
            self.forget_activity(&room);
            if self.proto {
                Member::FullProto(&self.outbox)
            } else {
                Member::Full(&self.outbox)
            }
        };
        let joined = self
            .node
            .rooms
            .join(&room, self.id, member, since)
            .map_err(room_error)?;
        self.set_room(&room, sub);
        Ok(Slot {
            room,
            since,
            at: joined.at,
        })
    }

    async fn publish(
        &mut self,
        id: Option<u32>,
        name: &str,
        data: &[u8],
        key: Option<&str>,
    ) -> Result<(), CloseReason> {
        let Some(room) = RoomId::parse(name) else {
            return self.bad_frame(id, &ProtoError::bad_request("invalid room name"));
        };
        // Authorization before any limiter: a command the token forbids
        // must not spend a budget shared with other users (nor tell by the
        // answer whether someone else just spent it).
        let now = Instant::now();
        let allowed = self.identity().grants.can_publish(room.as_str())
            || self.rooms.get(&room).is_some_and(|s| s.may_publish(now));
        if !allowed {
            return self.reply_err(
                id,
                &ProtoError::forbidden("the token does not grant publishing to this room"),
            );
        }
        if key.is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN) {
            return self.reply_err(id, &ProtoError::bad_request("key must be 1 to 256 bytes"));
        }
        if let Err(e) = protocol::check_data(data) {
            return self.bad_frame(id, &e);
        }
        if let Err(r) = self
            .node
            .limits
            .check_publish(&self.limits, &self.identity().sub, &room)
        {
            return self.rate_limited(id, r);
        }
        let started = std::time::Instant::now();
        let node = self.node.clone();
        let out = Outgoing {
            room: &room,
            from: &self.identity().sub,
            from_json: &self.from_json,
            data,
            key,
        };
        let result = node.bus.publish(&node.rooms, out).await;
        match result {
            Ok(p) => {
                let m = &node.metrics;
                if p.fresh {
                    m.published_total.increment(1);
                    m.deliveries_total.increment(p.delivered as u64);
                } else {
                    m.deduplicated_total.increment(1);
                }
                m.publish_seconds.record(started.elapsed().as_secs_f64());
                self.reply_ok(id, &format!("{{\"offset\":{}}}", p.offset))
            }
            Err(e) => {
                tracing::debug!(%room, error = %e, "publish failed");
                self.reply_err(id, &bus_error(&e))
            }
        }
    }

    async fn history(
        &mut self,
        id: Option<u32>,
        name: &str,
        limit: Option<u32>,
        before: Option<u64>,
    ) -> Result<(), CloseReason> {
        let Some(room) = RoomId::parse(name) else {
            return self.bad_frame(id, &ProtoError::bad_request("invalid room name"));
        };
        // Authorization first (see `publish`), then the limits.
        let now = Instant::now();
        let granted = self.identity().grants.can_subscribe(room.as_str())
            || self.rooms.get(&room).is_some_and(|s| s.grant_holds(now));
        if !granted {
            return self.reply_err(id, &ProtoError::forbidden("the token does not grant this room"));
        }
        if let Err(r) = self.limits.check_history() {
            return self.rate_limited(id, r);
        }
        // Without an `id` nobody would see the page: read nothing.
        let Some(id) = id else {
            return Ok(());
        };
        let limit = (limit.unwrap_or(50) as usize).min(self.node.cfg.history_page_max);
        let (frames, more) = match self.node.rooms.history(&room, before, limit) {
            HistoryPage::Frames { frames, more } => (frames, more),
            HistoryPage::NeedsBackend => match self.node.bus.history(&room, before, limit).await {
                Ok(page) => page,
                Err(e) => return self.reply_err(Some(id), &bus_error(&e)),
            },
        };
        // The page counts against the connection's one outbox bound and its
        // history byte budget: keep the newest messages that fit (the client
        // pages on with `before`), at least one.
        let replay = self.limits.replay_available();
        let fits = room_for(&self.outbox).1.min(replay);
        let mut start = frames.len();
        let mut size = 0;
        while start > 0 {
            let weight = frames[start - 1].as_bytes().len() + 1;
            if size + weight > fits && start < frames.len() {
                break;
            }
            size += weight;
            start -= 1;
        }
        if size > replay {
            // Not even the newest message fits the budget now.
            let r = self.limits.replay_limited(size);
            return self.rate_limited(Some(id), r);
        }
        self.limits.spend_replay(size);
        let more = more || start > 0;
        let mut body = String::with_capacity(size + 40);
        body.push_str("{\"messages\":[");
        for (i, f) in frames[start..].iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(std::str::from_utf8(f.as_bytes()).unwrap_or("null"));
        }
        let _ = write!(body, "],\"more\":{more}}}");
        // Past the bound (the client does not read) this overflows the
        // outbox: the connection is closed as a slow consumer.
        self.send(protocol::ok_reply(id, &body))
    }

    async fn refresh(&mut self, id: Option<u32>, token: &str) -> Result<(), CloseReason> {
        let identity = match self.node.verifier.verify_connect(token).await {
            Ok(i) => i,
            Err(e) => {
                self.node.metrics.auth_failed(e.label());
                return self.reply_err(id, &ProtoError::new(ErrorCode::Unauthorized, e.to_string()));
            }
        };
        if identity.sub != self.identity().sub {
            self.node.metrics.auth_failed("wrong_sub");
            return self.reply_err(
                id,
                &ProtoError::new(ErrorCode::Unauthorized, "token is for another user"),
            );
        }
        // Rooms the new grants no longer cover are left, with a push that says so.
        let revoked: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(room, sub)| !sub.by_token && !identity.grants.can_subscribe(room.as_str()))
            .map(|(room, _)| room.clone())
            .collect();
        for room in revoked {
            self.drop_room(&room);
            self.send(protocol::unsubscribed_push(
                &room,
                "the refreshed token does not grant this room",
            ))?;
        }
        let expires_in = self.set_expiry(identity.exp);
        self.identity = Some(identity);
        let body = format!(
            "{{\"expires_in\":{}}}",
            expires_in.map_or_else(|| "null".to_string(), |s| s.to_string())
        );
        self.reply_ok(id, &body)
    }
}

/// One room of a `subscribe` on its way through the phases.
struct Slot {
    room: RoomId,
    since: Option<u64>,
    /// The offset the membership took effect at and the catch-up; `None`
    /// until the room is live on this node.
    at: Option<(u64, Option<Catchup>)>,
}

/// What a `subscribe` may still queue as catch-up.
struct CatchupBudget {
    bytes: usize,
    frames: usize,
}

/// Room for a catch-up or a history page in `outbox`: (frames, bytes) left
/// under its caps, less a reserve for live messages that arrive meanwhile.
fn room_for(outbox: &ConnOutbox) -> (usize, usize) {
    let (frames, bytes) = outbox.room_left();
    let caps = outbox.limits();
    (
        frames.saturating_sub(caps.max_frames >> OUTBOX_RESERVE_SHIFT),
        bytes.saturating_sub(caps.max_bytes >> OUTBOX_RESERVE_SHIFT),
    )
}

/// Bytes of the catch-ups of `slots` served from this node's cache.
fn cached_catchup_bytes(slots: &[Result<Slot, ProtoError>]) -> usize {
    let bytes = |s: &Result<Slot, ProtoError>| match s.as_ref().ok()?.at.as_ref()?.1.as_ref()? {
        Catchup::Frames {
            frames,
            recovered: true,
        } => Some(frames.iter().map(Weighted::weight).sum::<usize>()),
        _ => None,
    };
    slots.iter().filter_map(bytes).sum()
}

/// Appends `frames` to the catch-up if they fit the budget; otherwise the
/// room is reported as not recovered and the client reloads its history.
fn take_within(catchup: &mut Vec<Frame>, frames: Vec<Frame>, recovered: bool, budget: &mut CatchupBudget) -> bool {
    if !recovered {
        return false;
    }
    let bytes: usize = frames.iter().map(Weighted::weight).sum();
    if bytes > budget.bytes || frames.len() > budget.frames {
        return false;
    }
    budget.bytes -= bytes;
    budget.frames -= frames.len();
    catchup.extend(frames);
    true
}

/// Leaves `room`; the last local member tells the bus.
fn leave(node: &Node, room: &RoomId, conn: ConnId) {
    if node.rooms.leave(room, conn) == Transition::LastLocal {
        node.bus.room_left(room);
    }
}

fn bus_error(e: &BusError) -> ProtoError {
    match e {
        BusError::Room(r) => room_error(*r),
        BusError::Unavailable(_) | BusError::Timeout => {
            ProtoError::new(ErrorCode::Unavailable, "the message bus is unavailable; retry")
        }
    }
}

fn room_error(e: RoomError) -> ProtoError {
    match e {
        RoomError::TooManyRooms => ProtoError::new(ErrorCode::LimitExceeded, "the node holds too many rooms"),
    }
}

fn read_error_reason(e: &ReadError) -> CloseReason {
    match e {
        ReadError::TooLarge => CloseReason::TooLarge,
        ReadError::BadUtf8 => CloseReason::BadPayload,
        ReadError::Protocol(_) => CloseReason::ProtocolError,
        ReadError::Eof | ReadError::Io(_) => CloseReason::ClientGone,
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Issue 18: a panic in a connection task (an `exp` overflow did it)
    /// skipped the cleanup after `select!`, and the room kept a zombie member
    /// whose socket still got room messages. The session leaves its rooms
    /// when it is dropped, unwinding included.
    #[tokio::test]
    async fn a_panicking_connection_task_still_leaves_its_rooms() {
        let node = crate::Node::new(crate::Config::default()).await.unwrap();
        let room = RoomId::parse("z").unwrap();
        let (task_node, task_room) = (node.clone(), room.clone());
        let ended = tokio::spawn(async move {
            let activity = OnceLock::new();
            let outbox: ConnOutbox = Arc::new(Outbox::new(OutboxLimits::default()));
            let mut s = Session::new(task_node.clone(), ConnId(7), outbox.clone(), &activity, Admit::none());
            task_node
                .rooms
                .join(&task_room, ConnId(7), Member::Full(&outbox), None)
                .unwrap();
            s.set_room(&task_room, RoomSub::BY_CONNECTION);
            assert_eq!(task_node.rooms.members(&task_room), 1);
            panic!("a bug in a command handler");
        })
        .await;
        assert!(ended.unwrap_err().is_panic());
        assert_eq!(node.rooms.members(&room), 0);
    }

    /// Every idle connection holds one `run` future: its size is part of the
    /// per-connection memory budget (issue 3: at most 4 KiB of RSS per idle
    /// connection). Command handlers are boxed so their state is only on the
    /// heap while they run; this keeps that from regressing.
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let node = crate::Node::new(crate::Config::default()).await.unwrap();
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        let fut = run(
            node,
            Reader::new(r, 1024, &[]),
            w,
            None,
            Upgrade {
                peer: "127.0.0.1:1".parse().unwrap(),
                admit: crate::limits::Admit::none(),
                identity: None,
                proto: false,
            },
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 2048, "conn::run future is {size} bytes");
        // 560 before the room-token timers (8 bytes) and the history byte
        // budget and per-limit retry times (72 bytes, in ConnLimits).
        assert!(
            std::mem::size_of::<Session>() <= 640,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}
