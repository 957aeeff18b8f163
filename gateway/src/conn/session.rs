//! A connection's session: who it is (its verified token and grants), the
//! rooms it follows and by which grant, its limits, and the reader loop that
//! turns client frames into commands (`commands`). Every grant with an
//! expiry is a deadline of the reader's one timer.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::time::Instant;

use super::shared::{leave, read_error_reason};
use crate::auth::{self, Identity};
use crate::control::{ConnHandle, Order};
use crate::error::{CloseReason, ErrorCode, ProtoError};
use crate::limits::{Admit, ConnLimits, RateLimited, Strikes};
use crate::model::{ConnId, RoomId};
use crate::node::Node;
use crate::protocol::SharedMessage;
use crate::protocol::{Codec, Command, Parsed, ReplyBody, ServerMsg};
use crate::rooms::Member;
use crate::rooms::{Activity, ConnOutbox, Frame, MemberSlot};
use crate::transport::deflate::Deflate;
use crate::transport::ws::{Incoming, Reader};

/// Longest publish `key`.
pub(super) const MAX_KEY_LEN: usize = 256;

/// Window over which bad frames are counted.
pub(super) const BAD_FRAME_WINDOW: Duration = Duration::from_secs(60);

/// A room this connection is subscribed to, by which grant, and where its
/// membership sits: 8 bytes (a user in 2,000 rooms, 100K users).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RoomSub {
    /// 0: subscribed under the connection token's grants. Otherwise through
    /// a room token, whose grant a refresh of the connection token does not
    /// revoke: the low 31 bits are when it ends ([`GrantEnd`]), the top bit
    /// says it grants publishing (beyond the connection's grants).
    pub(super) grant: u32,
    /// The full membership's slot in the room (to leave or switch modes).
    pub(super) member: Option<MemberSlot>,
}

/// When a grant ends, in whole seconds (rounded up) since the process
/// started: 4 bytes in every room entry of a connection instead of an
/// `Instant`'s 16 (2,000 rooms per user, 100K users).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct GrantEnd(std::num::NonZeroU32);

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl GrantEnd {
    /// The latest end (~68 years after start: 31 bits).
    const MAX: u32 = (1 << 31) - 1;

    /// The end at `deadline` (never earlier; capped at [`GrantEnd::MAX`]).
    pub(super) fn at(deadline: Instant) -> Self {
        let secs = deadline.saturating_duration_since(*EPOCH).as_secs_f64().ceil();
        let secs = u32::try_from(secs as u64).unwrap_or(Self::MAX).clamp(1, Self::MAX);
        Self(std::num::NonZeroU32::new(secs).unwrap_or(std::num::NonZeroU32::MIN))
    }

    /// The instant the grant ends.
    pub(super) fn instant(self) -> Instant {
        *EPOCH + Duration::from_secs(u64::from(self.0.get()))
    }
}

impl RoomSub {
    /// Subscribed under the connection token's grants.
    pub(super) const BY_CONNECTION: RoomSub = RoomSub { grant: 0, member: None };

    const TOKEN_PUB: u32 = 1 << 31;

    /// Subscribed through a room token that grants publishing or not and
    /// ends at `expires` (`None`: the latest end).
    pub(super) fn by_room_token(publish: bool, expires: Option<GrantEnd>) -> Self {
        let end = expires.map_or(GrantEnd::MAX, |e| e.0.get());
        Self {
            grant: end | if publish { Self::TOKEN_PUB } else { 0 },
            member: None,
        }
    }

    /// Subscribed through a room token.
    pub(super) fn by_token(&self) -> bool {
        self.grant != 0
    }

    /// When the room token's grant ends: its `exp` plus the leeway.
    pub(super) fn expires(&self) -> Option<GrantEnd> {
        std::num::NonZeroU32::new(self.grant & !Self::TOKEN_PUB).map(GrantEnd)
    }

    /// Whether the room token's grant still holds at `now` (always true for
    /// a room the connection token grants).
    pub(super) fn grant_holds(&self, now: Instant) -> bool {
        self.expires().is_none_or(|e| now < e.instant())
    }

    /// Whether the room token lets the connection publish at `now`.
    pub(super) fn may_publish(&self, now: Instant) -> bool {
        self.grant & Self::TOKEN_PUB != 0 && self.grant_holds(now)
    }
}

/// The wait for the server API's orders to a connection.
type OrdersWait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// (Re)arms `wait` for the next orders of `control` (forever pending
/// without one).
fn orders_wait(wait: &mut OrdersWait, control: Option<Arc<ConnHandle>>) {
    *wait = match control {
        Some(c) => Box::pin(async move { c.ready().await }),
        None => Box::pin(std::future::pending()),
    };
}

pub(super) struct Session<'a> {
    pub(super) node: Arc<Node>,
    pub(super) id: ConnId,
    pub(super) outbox: ConnOutbox,
    /// Pending `activity` counts of this connection's notify-mode rooms.
    pub(super) activity: &'a OnceLock<Arc<Activity>>,
    pub(super) identity: Option<Identity>,
    /// Speaks `gw.v1.proto` (binary frames) instead of `gw.v1.json`; see
    /// [`Session::codec`].
    pub(super) proto: bool,
    /// `permessage-deflate` was negotiated: replies are compressed (when it
    /// pays), room pushes are the frames compressed once per node.
    pub(super) deflate: Option<Deflate>,
    /// A pre-authenticated connection may still send `connect` first.
    pub(super) connect_allowed: bool,
    pub(super) rooms: HashMap<RoomId, RoomSub, foldhash::fast::RandomState>,
    /// Room-token grants by expiry: the reader's deadline includes the first.
    /// Boxed on first use: most connections hold no room token, and an idle
    /// connection's task stays small.
    #[allow(clippy::box_collection)]
    pub(super) grant_expiry: Option<Box<BTreeSet<(GrantEnd, RoomId)>>>,
    /// When the connection token's grant ends: its `exp` plus the leeway.
    pub(super) expires_at: Option<Instant>,
    pub(super) bad_frames: Strikes,
    pub(super) limits: ConnLimits,
    /// Orders from the server API (disconnect, unsubscribe, revocation);
    /// registered once the token is accepted.
    pub(super) control: Option<Arc<ConnHandle>>,
    /// Rooms this connection gets presence pushes for (boxed on first use:
    /// few connections ask, and a join need not ask presence otherwise).
    #[allow(clippy::box_collection)]
    pub(super) presence_watch: Option<Box<HashSet<RoomId, foldhash::fast::RandomState>>>,
}

/// Leaves every room however the task ends, a panic included: a member whose
/// task is gone must not stay in a room and keep receiving its messages.
impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.leave_all();
        // By the handle's own user: `accept` may fail after registering,
        // before `identity` is set (a revocation in between).
        if let Some(handle) = self.control.take() {
            self.node.control.registry.deregister(handle.user(), self.id);
        }
    }
}

impl<'a> Session<'a> {
    pub(super) fn new(
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
            deflate: None,
            connect_allowed: false,
            rooms: HashMap::default(),
            grant_expiry: None,
            expires_at: None,
            bad_frames,
            limits,
            control: None,
            presence_watch: None,
        }
    }

    pub(super) fn forget_activity(&self, room: &RoomId) {
        if let Some(a) = self.activity.get() {
            a.forget(room);
        }
    }

    pub(super) fn leave_all(&mut self) {
        for (room, sub) in &self.rooms {
            leave(&self.node, room, self.id, sub.member);
        }
        for room in self.presence_watch.take().into_iter().flat_map(|w| w.into_iter()) {
            self.node.presence.unwatch(&room, self.id);
        }
        self.rooms.clear();
        self.grant_expiry = None;
    }

    /// Records `room` as subscribed under `sub`, replacing (and un-timing)
    /// an earlier grant of the same room.
    pub(super) fn set_room(&mut self, room: &RoomId, sub: RoomSub) {
        if let Some(old) = self.rooms.insert(room.clone(), sub)
            && let Some(at) = old.expires()
        {
            self.forget_expiry(at, room);
        }
        if let Some(at) = sub.expires() {
            self.grant_expiry.get_or_insert_default().insert((at, room.clone()));
        }
    }

    /// The earliest room-token expiry, if any.
    pub(super) fn first_grant_expiry(&self) -> Option<Instant> {
        self.grant_expiry.as_ref()?.first().map(|(at, _)| at.instant())
    }

    pub(super) fn forget_expiry(&mut self, at: GrantEnd, room: &RoomId) {
        if let Some(g) = &mut self.grant_expiry {
            g.remove(&(at, room.clone()));
            if g.is_empty() {
                self.grant_expiry = None;
            }
        }
    }

    /// Starts or stops presence pushes of `room` to this connection (the
    /// latest subscription's choice holds; a connection without a
    /// registered identity gets none).
    pub(super) fn set_presence_watch(&mut self, room: &RoomId, on: bool) {
        match (on, &self.control) {
            (true, Some(c)) => {
                self.node.presence.watch(room, self.id, c);
                self.presence_watch.get_or_insert_default().insert(room.clone());
            }
            _ => {
                if let Some(w) = &mut self.presence_watch
                    && w.remove(room)
                {
                    self.node.presence.unwatch(room, self.id);
                    if w.is_empty() {
                        self.presence_watch = None;
                    }
                }
            }
        }
    }

    /// Leaves `room` if subscribed: membership, grant timer, activity count.
    pub(super) fn drop_room(&mut self, room: &RoomId) -> bool {
        let Some(sub) = self.rooms.remove(room) else {
            return false;
        };
        if let Some(at) = sub.expires() {
            self.forget_expiry(at, room);
        }
        leave(&self.node, room, self.id, sub.member);
        self.set_presence_watch(room, false);
        self.forget_activity(room);
        true
    }

    /// Ends the room-token grants that expired by `now`: a room the
    /// connection token does not grant is left with an `unsubscribed` push;
    /// one it does grant stays, without the token's extra rights.
    pub(super) fn expire_room_grants(&mut self, now: Instant) -> Result<(), CloseReason> {
        while self.first_grant_expiry().is_some_and(|at| at <= now) {
            let Some((_, room)) = self.grant_expiry.as_mut().and_then(|g| g.pop_first()) else {
                break;
            };
            if self.identity().grants.can_subscribe(room.as_str()) {
                if let Some(sub) = self.rooms.get_mut(&room) {
                    *sub = RoomSub {
                        member: sub.member,
                        ..RoomSub::BY_CONNECTION
                    };
                }
                continue;
            }
            self.drop_room(&room);
            let error = ProtoError::forbidden("the room token expired");
            self.send(&ServerMsg::Unsubscribed {
                room: &room,
                error: &error,
            })?;
        }
        Ok(())
    }

    /// The sub-protocol this connection speaks.
    pub(super) fn codec(&self) -> Codec {
        if self.proto { Codec::Proto } else { Codec::Json }
    }

    /// Queues a reply (or a push of this connection's own), encoded in the
    /// connection's codec (and compressed, if negotiated and it pays); a
    /// full outbox ends the connection as slow.
    pub(super) fn send(&self, msg: &ServerMsg<'_>) -> Result<(), CloseReason> {
        self.push(self.encode(msg))
    }

    /// `msg` as this connection's frame: its codec, compressed when
    /// negotiated and it pays.
    pub(super) fn encode(&self, msg: &ServerMsg<'_>) -> Frame {
        self.codec().encode(msg).deflated_or_plain(self.deflate)
    }

    /// How this connection follows a room in full mode: by codec, and among
    /// the members sharing the compressed frames when it negotiated
    /// compression with the full window (a smaller window gets the plain
    /// frames, which are always allowed).
    pub(super) fn full_member(&self) -> Member<'_> {
        match (self.deflate.is_some_and(Deflate::shares_frames), self.proto) {
            (true, _) => Member::Deflated {
                outbox: &self.outbox,
                codec: self.codec(),
            },
            (false, true) => Member::FullProto(&self.outbox),
            (false, false) => Member::Full(&self.outbox),
        }
    }

    /// The frame of a room message for this connection (catch-up): the one
    /// its room pushes are, shared with the room's other members.
    pub(super) fn room_frame(&self, m: &SharedMessage) -> Frame {
        self.full_member().frame(m).clone()
    }

    pub(super) fn parse(&self, frame: &Bytes) -> Parsed {
        self.codec().parse(frame)
    }

    pub(super) fn push(&self, frame: Frame) -> Result<(), CloseReason> {
        self.outbox.try_push(frame).map_err(|_| CloseReason::SlowConsumer)
    }

    pub(super) fn reply_err(&self, id: Option<u32>, err: &ProtoError) -> Result<(), CloseReason> {
        self.send(&ServerMsg::Error { id, error: err })
    }

    /// Answers a command that carried an `id` (one without gets no reply).
    pub(super) fn reply_ok(&self, id: Option<u32>, ok: ReplyBody<'_>) -> Result<(), CloseReason> {
        match id {
            Some(id) => self.send(&ServerMsg::Reply { id, ok }),
            None => Ok(()),
        }
    }

    /// Counts a bad frame; too many within the window is a policy violation.
    pub(super) fn bad_frame(&mut self, id: Option<u32>, err: &ProtoError) -> Result<(), CloseReason> {
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
    pub(super) fn rate_limited(&mut self, id: Option<u32>, r: RateLimited) -> Result<(), CloseReason> {
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
    pub(super) async fn read_loop<R: AsyncRead + Unpin>(
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
        // Boxed once per connection, not per frame: an idle connection's
        // task stays small (its size is checked by a test).
        let mut orders: OrdersWait = Box::pin(std::future::pending());
        orders_wait(&mut orders, self.control.clone());
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
            let next = tokio::select! {
                () = &mut orders => {
                    orders_wait(&mut orders, self.control.clone());
                    if let Err(reason) = self.obey() {
                        return reason;
                    }
                    continue;
                }
                next = tokio::time::timeout_at(deadline, reader.next()) => next,
            };
            let msg = match next {
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

    pub(super) async fn command(&mut self, frame: Bytes) -> Result<(), CloseReason> {
        match self.limits.check_bytes(frame.len()) {
            // Boxed: a command's state lives on the heap only while it
            // runs, so an idle connection stays small.
            Ok(()) => Box::pin(self.handle(frame)).await,
            Err(r) => self.rate_limited(self.parse(&frame).id, r),
        }
    }

    pub(super) async fn authenticate<R: AsyncRead + Unpin>(
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
    pub(super) async fn connect(&mut self, id: Option<u32>, token: &str) -> Result<(), CloseReason> {
        match self.node.verifier.verify_connect(token).await {
            Ok(identity) => self.accept(identity, id),
            Err(e) => {
                self.node.metrics.auth_failed(e.label());
                self.reply_err(id, &ProtoError::new(ErrorCode::Unauthorized, e.to_string()))?;
                Err(CloseReason::Unauthorized)
            }
        }
    }

    /// Carries out orders from the server API.
    pub(super) fn obey(&mut self) -> Result<(), CloseReason> {
        let orders = self.control.as_ref().map(|c| c.take()).unwrap_or_default();
        for order in orders {
            match order {
                Order::Close { code, reconnect } => return Err(CloseReason::Disconnected { code, reconnect }),
                Order::Revoked => return Err(CloseReason::Revoked),
                Order::Presence {
                    room,
                    count,
                    join,
                    leave,
                } => {
                    if self.rooms.contains_key(&room) {
                        self.send(&ServerMsg::Presence {
                            room: &room,
                            count,
                            join: &join,
                            leave: &leave,
                        })?;
                    }
                }
                Order::Unsubscribe(room) => {
                    if self.drop_room(&room) {
                        let error = ProtoError::forbidden("unsubscribed by the server");
                        self.send(&ServerMsg::Unsubscribed {
                            room: &room,
                            error: &error,
                        })?;
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn accept(&mut self, identity: Identity, id: Option<u32>) -> Result<(), CloseReason> {
        if self.node.control.revocations.is_revoked(&identity.sub, identity.iat) {
            self.node.metrics.auth_failed("revoked");
            self.reply_err(id, &ProtoError::new(ErrorCode::Unauthorized, "the token was revoked"))?;
            return Err(CloseReason::Unauthorized);
        }
        let cap = self.node.cfg.user_max_conns;
        let Some(handle) = self
            .node
            .control
            .registry
            .register(&identity.sub, self.id, identity.iat, cap)
        else {
            self.reply_err(
                id,
                &ProtoError::new(
                    ErrorCode::LimitExceeded,
                    format!("{} connections of this user on this node (--user-max-conns)", cap),
                ),
            )?;
            return Err(CloseReason::TooManyConnections);
        };
        self.control = Some(handle);
        // A revocation stored between the check and the registration.
        if self.node.control.revocations.is_revoked(&identity.sub, identity.iat) {
            return Err(CloseReason::Revoked);
        }
        let expires_in = self.set_expiry(identity.exp);
        self.identity = Some(identity);
        let client = self.client_id();
        // `max_frame_bytes` (an extension): a client splits a `subscribe`
        // that would not fit one frame.
        let ok = ReplyBody::Connect {
            client: &client,
            node: &self.node.cfg.node_id,
            expires_in,
            max_frame_bytes: self.node.cfg.max_frame_bytes as u64,
        };
        self.reply_ok(id, ok)
    }

    pub(super) fn client_id(&self) -> String {
        format!("{}-{:x}", self.node.cfg.node_id, self.id.0)
    }

    /// Sets the expiry timer (one per connection, reset by `refresh`) to
    /// `exp` plus the leeway the token was verified with, so a token accepted
    /// inside the leeway is not closed the moment it is accepted; returns
    /// whole seconds until `exp` itself (None without `exp`).
    pub(super) fn set_expiry(&mut self, exp: Option<u64>) -> Option<u64> {
        let Some(exp) = exp else {
            self.expires_at = None;
            return None;
        };
        self.expires_at = Some(auth::deadline(exp, self.node.verifier.leeway()));
        // The token's own time left, not the timer's (capped at a year).
        Some(exp.saturating_sub(auth::now_secs()))
    }

    pub(super) async fn handle(&mut self, frame: Bytes) -> Result<(), CloseReason> {
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
            Command::Unsubscribe { rooms } => self.unsubscribe(id, rooms),
            Command::Publish { room, data, key } => Box::pin(self.publish(id, &room, &data, key.as_deref())).await,
            Command::History { room, limit, before } => Box::pin(self.history(id, &room, limit, before)).await,
            Command::Refresh { token } => Box::pin(self.refresh(id, &token)).await,
            Command::Presence { room } => Box::pin(self.presence(id, &room)).await,
            Command::Ping => {
                self.send(&ServerMsg::Pong)?;
                self.reply_ok(id, ReplyBody::Empty)
            }
        }
    }

    pub(super) fn identity(&self) -> &Identity {
        self.identity.as_ref().expect("commands run only after connect")
    }
}
