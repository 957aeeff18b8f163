//! Rate limits and admission control.
//!
//! Owns every budget the node enforces on clients, all GCRA limiters from
//! `governor`:
//! - per connection ([`ConnLimits`]): publishes, rooms subscribed per second,
//!   `history` requests, bytes of client frames; plus the count of
//!   `rate_limited` replies that turns repeated abuse into close 4008;
//! - shared by the node ([`Limits`]): publishes per user (across that user's
//!   connections on this node) and per room, the room limit chosen by the
//!   room's namespace (the name before its first `:`);
//! - admission ([`Limits::admit`]): a node-wide budget of new connections per
//!   second, a cap on handshakes in progress, and optional per-address caps.
//!   It runs before the WebSocket upgrade and answers 503 or 429 with
//!   `Retry-After`, so a reconnect storm is served at a steady rate.
//!
//! Does not own the connection-count cap (`max_connections`, in `conn`) nor the
//! replies (the connection task turns a [`RateLimited`] into the wire error).
//!
//! Every limit is per node: with N nodes behind a balancer, a user spread over
//! them may publish up to N times the per-user rate.
//!
//! Memory: a connection's limiters are four direct GCRA states of a few words
//! each, allocated inline in its task (no map entry per connection). Keyed
//! state (per user, per room, per address) lives in DashMaps that
//! [`Limits::sweep_forever`] prunes every [`SWEEP_INTERVAL`] with
//! `retain_recent` (a key whose bucket is full again is indistinguishable from
//! a fresh one and goes); a map still holding more than `max_keys` after that
//! is replaced by an empty one (every key starts fresh, counted in
//! `gateway_rate_limit_resets_total`). Publishes are checked per connection
//! first, so keyed state grows at most at the node's allowed publish rate.
//!
//! Concurrency: direct limiters are atomics; keyed maps are sharded, and the
//! `RwLock` around each is only written when a map is replaced. No guard is
//! held across `.await`.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use dashmap::DashMap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::RwLock;
use tokio::time::Instant;

use crate::metrics;
use crate::rooms::RoomId;

/// How often keyed state is pruned.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Keyed maps are shrunk (memory handed back) every this many sweeps.
const SHRINK_EVERY: u32 = 15;

/// A direct (unkeyed) GCRA limiter.
pub type DirectLimiter<C = MonotonicClock> =
    RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type KeyedLimiter<K> = RateLimiter<K, DashMapStateStore<K>, MonotonicClock, NoOpMiddleware<std::time::Instant>>;

/// A rate: `per_sec` cells refill each second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

impl Rate {
    /// `None` when `per_sec` is 0 (the limit is off). A zero burst is raised to 1.
    pub fn new(per_sec: u32, burst: u32) -> Option<Rate> {
        (per_sec > 0).then_some(Rate {
            per_sec,
            burst: burst.max(1),
        })
    }

    fn quota(self) -> Quota {
        Quota::per_second(nonzero(self.per_sec)).allow_burst(nonzero(self.burst))
    }

    fn direct(self) -> DirectLimiter {
        RateLimiter::direct_with_clock(self.quota(), MonotonicClock)
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

/// Every rate limit and admission budget, resolved (see `docs/operations.md`).
/// `None` or 0 means the limit is off.
#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// Publishes per connection. Default 5/s, burst 10.
    pub publish: Option<Rate>,
    /// Publishes per user across its connections on this node. Default 10/s, burst 20.
    pub user_publish: Option<Rate>,
    /// Publishes per room entering through this node. Default 50/s, burst 100.
    pub room_publish: Option<Rate>,
    /// Per-room publish rate by room namespace (the name before the first `:`);
    /// `None` means rooms of that namespace have no per-room limit. Default empty.
    pub room_namespaces: BTreeMap<String, Option<Rate>>,
    /// Rooms subscribed per second per connection; a frame costs its room count
    /// (at most the burst). Default 100/s, burst `max_rooms_per_conn`.
    pub subscribe_rooms: Option<Rate>,
    /// `history` requests per connection. Default 5/s, burst 10.
    pub history: Option<Rate>,
    /// Bytes of client data frames per connection. Default 64 KiB/s, burst 2 x `max_frame_bytes`.
    pub client_bytes: Option<Rate>,
    /// Bytes one connection may be sent from history (catch-up and `history`
    /// pages). Default 1 MiB/s, burst `catchup_max_bytes` (4 MiB).
    pub replay_bytes: Option<Rate>,
    /// `rate_limited` replies to commands sent before the previous refusal's
    /// `retry_after_ms` had passed, tolerated per window; one more closes
    /// with 4008. A client that waits as told never counts. Default 20.
    pub max_rate_limited: u32,
    /// The window for `max_rate_limited`. Default 10 s.
    pub rate_limited_window: Duration,
    /// New connections per second, node-wide; more get HTTP 503. Default 2,000/s, burst 2,000.
    pub connects: Option<Rate>,
    /// Upgrades accepted but not yet through `connect`; more get HTTP 503. Default 1,000; 0 = off.
    pub max_handshakes: usize,
    /// Open connections per client address; more get HTTP 429. Default 0 (off).
    pub addr_max_conns: usize,
    /// New connections per second per client address; more get HTTP 429. Default off.
    pub addr_connects: Option<Rate>,
    /// Header to read the client address from (e.g. X-Forwarded-For; right-most entry). Default none.
    pub trusted_proxy_header: Option<HeaderName>,
    /// Keys one keyed limiter may hold after pruning before it is reset. Default 100,000.
    pub max_keys: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            publish: Rate::new(5, 10),
            user_publish: Rate::new(10, 20),
            room_publish: Rate::new(100, 200),
            room_namespaces: BTreeMap::new(),
            subscribe_rooms: Rate::new(100, 5_000),
            history: Rate::new(5, 10),
            client_bytes: Rate::new(64 * 1024, 512 * 1024),
            replay_bytes: Rate::new(1 << 20, 4 << 20),
            max_rate_limited: 20,
            rate_limited_window: Duration::from_secs(10),
            connects: Rate::new(2_000, 2_000),
            max_handshakes: 1_000,
            addr_max_conns: 0,
            addr_connects: None,
            trusted_proxy_header: None,
            max_keys: 100_000,
        }
    }
}

/// Which limit refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Publish,
    UserPublish,
    RoomPublish,
    Subscribe,
    History,
    Bytes,
}

impl Limit {
    const ALL: [Limit; 6] = [
        Limit::Publish,
        Limit::UserPublish,
        Limit::RoomPublish,
        Limit::Subscribe,
        Limit::History,
        Limit::Bytes,
    ];

    /// A label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Publish => "publish_conn",
            Limit::UserPublish => "publish_user",
            Limit::RoomPublish => "publish_room",
            Limit::Subscribe => "subscribe",
            Limit::History => "history",
            Limit::Bytes => "bytes",
        }
    }
}

impl Limit {
    fn index(self) -> usize {
        match self {
            Limit::Publish => 0,
            Limit::UserPublish => 1,
            Limit::RoomPublish => 2,
            Limit::Subscribe => 3,
            Limit::History => 4,
            Limit::Bytes => 5,
        }
    }
}

/// A command over a limit, and how long until it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub limit: Limit,
    pub retry_after: Duration,
}

impl RateLimited {
    /// `retry_after_ms` for the wire: rounded up, at least 1.
    pub fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.retry_after.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Takes `n` cells (at most the burst, at least 1) from `lim`, or says how long
/// until they would be available. Capping at the burst lets a frame larger
/// than the burst through when the bucket is full (it then empties it).
pub fn take<C: Clock>(lim: &DirectLimiter<C>, n: usize, burst: u32) -> Result<(), Duration> {
    let n = nonzero(u32::try_from(n).unwrap_or(u32::MAX).min(burst));
    match lim.check_n(n) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(not_until.wait_time_from(lim.clock().now())),
        // Unreachable with n <= burst; refuse for a second rather than panic.
        Err(_) => Err(Duration::from_secs(1)),
    }
}

/// Counts events in fixed windows: more than `max` within one window is too many.
#[derive(Debug, Clone)]
pub struct Strikes {
    max: u32,
    window: Duration,
    count: u32,
    since: Instant,
}

impl Strikes {
    pub fn new(max: u32, window: Duration, now: Instant) -> Self {
        Self {
            max,
            window,
            count: 0,
            since: now,
        }
    }

    /// Counts one event at `now`; true when the current window now holds more than `max`.
    pub fn hit(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) > self.window {
            self.since = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count > self.max
    }
}

/// A byte budget that refills continuously: `per_sec` bytes a second up to
/// `burst`. Unlike a governor limiter, which only answers whether a given
/// amount passes, it tells its balance, which is what sizing a catch-up
/// needs (take what is left, report the rest as not recovered).
#[derive(Debug, Clone)]
pub struct ByteBudget {
    per_sec: u32,
    burst: u32,
    /// Bytes available at `at`.
    level: f64,
    at: Instant,
}

impl ByteBudget {
    /// A full budget.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            per_sec: rate.per_sec,
            burst: rate.burst,
            level: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * f64::from(self.per_sec)).min(f64::from(self.burst));
        self.at = now;
    }

    /// Bytes that may be sent now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.level as usize
    }

    /// Spends `n` bytes (the balance may go below zero by what one page
    /// overshoots; it is paid back before anything else passes).
    pub fn spend(&mut self, n: usize, now: Instant) {
        self.refill(now);
        self.level -= n as f64;
    }

    /// How long until `n` bytes (at most the burst) are available.
    pub fn wait_for(&mut self, n: usize, now: Instant) -> Duration {
        self.refill(now);
        let want = (n as f64).min(f64::from(self.burst));
        if self.level >= want {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((want - self.level) / f64::from(self.per_sec.max(1)))
    }
}

/// One connection's limiters and admission guards, inline in its task.
pub struct ConnLimits {
    publish: Option<DirectLimiter>,
    subscribe: Option<(DirectLimiter, u32)>,
    history: Option<DirectLimiter>,
    bytes: Option<(DirectLimiter, u32)>,
    replay: Option<ByteBudget>,
    strikes: Strikes,
    /// Per [`Limit`]: when its last refusal said the client could retry, in
    /// ms since `base`. A refused command that arrives earlier did not wait
    /// as told and counts as a strike.
    retry_at: [u32; 6],
    base: Instant,
    admit: Admit,
}

impl ConnLimits {
    /// Charges a client data frame of `len` bytes.
    pub fn check_bytes(&self, len: usize) -> Result<(), RateLimited> {
        match &self.bytes {
            Some((lim, burst)) => take(lim, len, *burst).map_err(|d| limited(Limit::Bytes, d)),
            None => Ok(()),
        }
    }

    /// Charges a `subscribe` frame with `rooms` entries (at least one cell, at most the burst).
    pub fn check_subscribe(&self, rooms: usize) -> Result<(), RateLimited> {
        match &self.subscribe {
            Some((lim, burst)) => take(lim, rooms, *burst).map_err(|d| limited(Limit::Subscribe, d)),
            None => Ok(()),
        }
    }

    /// Charges a `history` request.
    pub fn check_history(&self) -> Result<(), RateLimited> {
        match &self.history {
            Some(lim) => take(lim, 1, 1).map_err(|d| limited(Limit::History, d)),
            None => Ok(()),
        }
    }

    /// Bytes that may be sent from history now (`usize::MAX` without a budget).
    pub fn replay_available(&mut self) -> usize {
        match &mut self.replay {
            Some(b) => b.available(Instant::now()),
            None => usize::MAX,
        }
    }

    /// Spends `n` bytes of the history budget.
    pub fn spend_replay(&mut self, n: usize) {
        if let Some(b) = &mut self.replay {
            b.spend(n, Instant::now());
        }
    }

    /// The refusal for a history page of `n` bytes that does not fit the
    /// budget now.
    pub fn replay_limited(&mut self, n: usize) -> RateLimited {
        let wait = match &mut self.replay {
            Some(b) => b.wait_for(n, Instant::now()),
            None => Duration::ZERO,
        };
        limited(Limit::History, wait.max(Duration::from_millis(1)))
    }

    /// Counts a `rate_limited` reply `r`; true when the connection should
    /// close with 4008. Only a command sent before the previous refusal of
    /// the same limit said it could be retried counts: a client that waits
    /// `retry_after_ms` as told is never closed for it.
    pub fn strike(&mut self, r: &RateLimited) -> bool {
        let now = Instant::now();
        let mut elapsed = now.saturating_duration_since(self.base).as_millis();
        if elapsed > u128::from(u32::MAX / 2) {
            // After 24 days: start counting from now (no refusal is pending
            // that long).
            self.base = now;
            self.retry_at = [0; 6];
            elapsed = 0;
        }
        let now_ms = elapsed as u32;
        let slot = &mut self.retry_at[r.limit.index()];
        let early = now_ms < *slot;
        let wait = u32::try_from(r.retry_after_ms()).unwrap_or(u32::MAX / 4);
        *slot = now_ms.saturating_add(wait);
        early && self.strikes.hit(now)
    }

    /// The connection got through `connect`: it no longer counts as a handshake in progress.
    pub fn handshake_done(&mut self) {
        self.admit.handshake = None;
    }
}

fn limited(limit: Limit, retry_after: Duration) -> RateLimited {
    RateLimited { limit, retry_after }
}

/// A keyed limiter that can be reset when it holds too many keys.
struct Keyed<K: Hash + Eq + Clone> {
    quota: Quota,
    inner: RwLock<KeyedLimiter<K>>,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(rate: Rate) -> Self {
        let quota = rate.quota();
        Self {
            quota,
            inner: RwLock::new(RateLimiter::dashmap_with_clock(quota, MonotonicClock)),
        }
    }

    fn check(&self, key: &K) -> Result<(), Duration> {
        let lim = self.inner.read();
        lim.check_key(key)
            .map_err(|not_until| not_until.wait_time_from(lim.clock().now()))
    }

    /// Prunes keys back to fresh state; resets the map when more than `max`
    /// remain. Returns the keys left and whether it reset.
    fn sweep(&self, max: usize, shrink: bool) -> (usize, bool) {
        let left = {
            let lim = self.inner.read();
            lim.retain_recent();
            if shrink {
                lim.shrink_to_fit();
            }
            lim.len()
        };
        if left > max {
            *self.inner.write() = RateLimiter::dashmap_with_clock(self.quota, MonotonicClock);
            return (0, true);
        }
        (left, false)
    }
}

/// Per-room publish limiters: one per configured namespace, one for the rest.
struct RoomLimiters {
    default: Option<Keyed<RoomId>>,
    namespaces: HashMap<Box<str>, Option<Keyed<RoomId>>>,
}

impl RoomLimiters {
    fn for_room(&self, room: &RoomId) -> Option<&Keyed<RoomId>> {
        match namespace(room.as_str()).and_then(|ns| self.namespaces.get(ns)) {
            Some(configured) => configured.as_ref(),
            None => self.default.as_ref(),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Keyed<RoomId>> {
        self.default.iter().chain(self.namespaces.values().flatten())
    }
}

/// A room's namespace: the part of its name before the first `:`, if any.
pub fn namespace(room: &str) -> Option<&str> {
    room.split_once(':').map(|(ns, _)| ns)
}

/// Why an upgrade was refused before it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node-wide budget of new connections per second is spent (503).
    Budget(Duration),
    /// Too many handshakes in progress (503).
    Handshakes,
    /// Too many open connections from this address (429).
    AddressConns,
    /// Too many new connections per second from this address (429).
    AddressRate(Duration),
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Budget(_) | Refusal::Handshakes => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::AddressConns | Refusal::AddressRate(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Seconds for the `Retry-After` header (at least 1).
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Refusal::Budget(d) | Refusal::AddressRate(d) => retry_after_secs(d),
            Refusal::Handshakes | Refusal::AddressConns => 1,
        }
    }

    /// A label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Budget(_) => "budget",
            Refusal::Handshakes => "handshakes",
            Refusal::AddressConns => "address_conns",
            Refusal::AddressRate(_) => "address_rate",
        }
    }

    fn index(self) -> usize {
        match self {
            Refusal::Budget(_) => 0,
            Refusal::Handshakes => 1,
            Refusal::AddressConns => 2,
            Refusal::AddressRate(_) => 3,
        }
    }

    /// The human-readable body of the refusal.
    pub fn text(self) -> &'static str {
        match self {
            Refusal::Budget(_) => "too many new connections, retry later",
            Refusal::Handshakes => "too many handshakes in progress, retry later",
            Refusal::AddressConns => "too many connections from this address",
            Refusal::AddressRate(_) => "too many new connections from this address, retry later",
        }
    }
}

/// What an admitted connection holds until it ends: its place among the
/// handshakes in progress (until `connect`) and among its address's connections.
#[derive(Default)]
pub struct Admit {
    handshake: Option<HandshakeGuard>,
    address: Option<AddressGuard>,
}

impl Admit {
    /// An admission that holds nothing (connections not made through `admit`).
    pub fn none() -> Self {
        Self::default()
    }
}

struct HandshakeGuard(Arc<AtomicUsize>);

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct AddressGuard {
    map: Arc<DashMap<IpAddr, u32>>,
    ip: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        self.map.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

struct Admission {
    budget: Option<DirectLimiter>,
    max_handshakes: usize,
    handshakes: Arc<AtomicUsize>,
    handshakes_peak: AtomicUsize,
    addr_max_conns: usize,
    addr_conns: Arc<DashMap<IpAddr, u32>>,
    addr_rate: Option<Keyed<IpAddr>>,
    proxy_header: Option<HeaderName>,
}

struct LimitMetrics {
    rate_limited: [Counter; 6],
    refused: [Counter; 4],
    resets: Counter,
    keys: Gauge,
    handshakes: Gauge,
}

/// The node's limits: quotas for new connections' limiters, the keyed
/// limiters shared by all connections, and admission control.
pub struct Limits {
    conn: ConnQuotas,
    user: Option<Keyed<String>>,
    rooms: RoomLimiters,
    admission: Admission,
    max_keys: usize,
    metrics: LimitMetrics,
}

struct ConnQuotas {
    publish: Option<Rate>,
    subscribe: Option<Rate>,
    history: Option<Rate>,
    bytes: Option<Rate>,
    replay: Option<Rate>,
    max_rate_limited: u32,
    rate_limited_window: Duration,
}

impl Limits {
    /// Builds the limits. With `enabled` false (`--no-rate-limits`) every rate
    /// limit and admission budget is off; the per-address connection cap stays
    /// (it counts connections, like `max_connections`).
    pub fn new(cfg: &LimitConfig, enabled: bool) -> Self {
        // Handles made before the recorder is installed would count nowhere.
        metrics::prometheus();
        let on = |r: Option<Rate>| if enabled { r } else { None };
        let namespaces = if enabled {
            cfg.room_namespaces
                .iter()
                .map(|(ns, rate)| (Box::from(ns.as_str()), rate.map(Keyed::new)))
                .collect()
        } else {
            HashMap::new()
        };
        Self {
            conn: ConnQuotas {
                publish: on(cfg.publish),
                subscribe: on(cfg.subscribe_rooms),
                history: on(cfg.history),
                bytes: on(cfg.client_bytes),
                replay: on(cfg.replay_bytes),
                max_rate_limited: cfg.max_rate_limited,
                rate_limited_window: cfg.rate_limited_window,
            },
            user: on(cfg.user_publish).map(Keyed::new),
            rooms: RoomLimiters {
                default: on(cfg.room_publish).map(Keyed::new),
                namespaces,
            },
            admission: Admission {
                budget: on(cfg.connects).map(Rate::direct),
                max_handshakes: if enabled { cfg.max_handshakes } else { 0 },
                handshakes: Arc::new(AtomicUsize::new(0)),
                handshakes_peak: AtomicUsize::new(0),
                addr_max_conns: cfg.addr_max_conns,
                addr_conns: Arc::new(DashMap::new()),
                addr_rate: on(cfg.addr_connects).map(Keyed::new),
                proxy_header: cfg.trusted_proxy_header.clone(),
            },
            max_keys: cfg.max_keys,
            metrics: LimitMetrics {
                rate_limited: Limit::ALL.map(|l| metrics::rate_limited(l.label())),
                refused: [
                    Refusal::Budget(Duration::ZERO),
                    Refusal::Handshakes,
                    Refusal::AddressConns,
                    Refusal::AddressRate(Duration::ZERO),
                ]
                .map(|r| metrics::admission_refused(r.label())),
                resets: metrics::rate_limit_resets(),
                keys: metrics::rate_limit_keys(),
                handshakes: metrics::handshakes_in_progress(),
            },
        }
    }

    /// Fresh limiters for a new connection, holding its admission guards.
    pub fn conn(&self, admit: Admit) -> ConnLimits {
        let q = &self.conn;
        ConnLimits {
            publish: q.publish.map(Rate::direct),
            subscribe: q.subscribe.map(|r| (r.direct(), r.burst)),
            history: q.history.map(Rate::direct),
            bytes: q.bytes.map(|r| (r.direct(), r.burst)),
            replay: q.replay.map(|r| ByteBudget::new(r, Instant::now())),
            strikes: Strikes::new(q.max_rate_limited, q.rate_limited_window, Instant::now()),
            retry_at: [0; 6],
            base: Instant::now(),
            admit,
        }
    }

    /// Charges a publish by `user` to `room` from `conn`: per connection first
    /// (no shared state is touched for a connection over its own limit), then
    /// per user, then per room. A refusal by a later limiter does not refund
    /// the earlier ones.
    pub fn check_publish(&self, conn: &ConnLimits, user: &String, room: &RoomId) -> Result<(), RateLimited> {
        if let Some(lim) = &conn.publish {
            take(lim, 1, 1).map_err(|d| limited(Limit::Publish, d))?;
        }
        if let Some(lim) = &self.user {
            lim.check(user).map_err(|d| limited(Limit::UserPublish, d))?;
        }
        if let Some(lim) = self.rooms.for_room(room) {
            lim.check(room).map_err(|d| limited(Limit::RoomPublish, d))?;
        }
        Ok(())
    }

    /// Counts a `rate_limited` reply.
    pub fn record(&self, r: &RateLimited) {
        let i = Limit::ALL.iter().position(|l| *l == r.limit).unwrap_or(0);
        self.metrics.rate_limited[i].increment(1);
    }

    /// Admission control for an upgrade request from `peer`, before the upgrade.
    /// Cheap: atomics, at most two map entries, no allocation on refusal.
    pub fn admit(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Admit, Refusal> {
        let r = self.admit_inner(headers, peer);
        if let Err(refusal) = r {
            self.metrics.refused[refusal.index()].increment(1);
        }
        r
    }

    fn admit_inner(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Admit, Refusal> {
        let a = &self.admission;
        let mut admit = Admit::default();
        if a.max_handshakes > 0 {
            let n = a.handshakes.fetch_add(1, Ordering::Relaxed) + 1;
            admit.handshake = Some(HandshakeGuard(a.handshakes.clone()));
            if n > a.max_handshakes {
                return Err(Refusal::Handshakes);
            }
            a.handshakes_peak.fetch_max(n, Ordering::Relaxed);
        }
        if a.addr_max_conns > 0 || a.addr_rate.is_some() {
            let ip = client_ip(headers, peer.ip(), a.proxy_header.as_ref());
            if a.addr_max_conns > 0 {
                let n = {
                    let mut count = a.addr_conns.entry(ip).or_insert(0);
                    *count += 1;
                    *count
                };
                admit.address = Some(AddressGuard {
                    map: a.addr_conns.clone(),
                    ip,
                });
                if n as usize > a.addr_max_conns {
                    return Err(Refusal::AddressConns);
                }
            }
            if let Some(lim) = &a.addr_rate {
                lim.check(&ip).map_err(Refusal::AddressRate)?;
            }
        }
        if let Some(lim) = &a.budget {
            take(lim, 1, 1).map_err(Refusal::Budget)?;
        }
        Ok(admit)
    }

    /// Upgrades admitted and not yet through `connect`, right now.
    pub fn handshakes_in_progress(&self) -> usize {
        self.admission.handshakes.load(Ordering::Relaxed)
    }

    /// The most handshakes ever in progress at once (never above the cap).
    pub fn handshakes_peak(&self) -> usize {
        self.admission.handshakes_peak.load(Ordering::Relaxed)
    }

    /// Keys held by all keyed limiters (user, room, address).
    pub fn keys(&self) -> usize {
        let user = self.user.as_ref().map_or(0, |k| k.inner.read().len());
        let rooms: usize = self.rooms.all().map(|k| k.inner.read().len()).sum();
        let addr = self.admission.addr_rate.as_ref().map_or(0, |k| k.inner.read().len());
        user + rooms + addr + self.admission.addr_conns.len()
    }

    /// Prunes keyed state every [`SWEEP_INTERVAL`]; never returns.
    pub async fn sweep_forever(&self) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u32 = 0;
        loop {
            tick.tick().await;
            n = n.wrapping_add(1);
            self.sweep(n.is_multiple_of(SHRINK_EVERY));
        }
    }

    /// One pruning pass over every keyed limiter.
    pub fn sweep(&self, shrink: bool) {
        let mut keys = self.admission.addr_conns.len();
        let mut resets = 0;
        let mut one = |(left, reset): (usize, bool)| {
            keys += left;
            resets += u64::from(reset);
        };
        if let Some(k) = &self.user {
            one(k.sweep(self.max_keys, shrink));
        }
        for k in self.rooms.all() {
            one(k.sweep(self.max_keys, shrink));
        }
        if let Some(k) = &self.admission.addr_rate {
            one(k.sweep(self.max_keys, shrink));
        }
        if resets > 0 {
            tracing::warn!(
                max_keys = self.max_keys,
                "a rate limiter held too many keys and was reset; raise rate_limit_max_keys"
            );
            self.metrics.resets.increment(resets);
        }
        self.metrics.keys.set(keys as f64);
        self.metrics.handshakes.set(self.handshakes_in_progress() as f64);
    }
}

/// The client's address: from `header` when configured and present (its
/// right-most entry, the one the trusted proxy appended), else the socket peer.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, header: Option<&HeaderName>) -> IpAddr {
    let Some(name) = header else {
        return peer;
    };
    headers
        .get_all(name)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(parse_forwarded_addr)
        .unwrap_or(peer)
}

/// Parses one forwarded entry: `1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`,
/// or an RFC 7239 element such as `for="[::1]:80";proto=https`.
fn parse_forwarded_addr(entry: &str) -> Option<IpAddr> {
    let mut s = entry.trim();
    if let Some(f) = s
        .split(';')
        .map(str::trim)
        .find(|p| p.len() > 4 && p[..4].eq_ignore_ascii_case("for="))
    {
        s = f[4..].trim_matches('"');
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.split(']').next())
        .and_then(|r| r.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn fake(rate: Rate) -> (DirectLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiter::direct_with_clock(rate.quota(), clock.clone()), clock)
    }

    #[test]
    fn burst_then_refill_with_retry_after() {
        let (lim, clock) = fake(Rate::new(5, 10).unwrap());
        for _ in 0..10 {
            assert_eq!(take(&lim, 1, 10), Ok(()));
        }
        // One cell refills every 200 ms.
        assert_eq!(take(&lim, 1, 10), Err(Duration::from_millis(200)));
        clock.advance(Duration::from_millis(150));
        assert_eq!(take(&lim, 1, 10), Err(Duration::from_millis(50)));
        clock.advance(Duration::from_millis(50));
        assert_eq!(take(&lim, 1, 10), Ok(()));
    }

    #[test]
    fn a_frame_larger_than_the_burst_passes_on_a_full_bucket_and_empties_it() {
        let (lim, clock) = fake(Rate::new(100, 50).unwrap());
        assert_eq!(take(&lim, 2_000, 50), Ok(()));
        assert!(take(&lim, 1, 50).is_err());
        clock.advance(Duration::from_millis(500));
        assert_eq!(take(&lim, 50, 50), Ok(()));
        // An empty subscribe still costs one cell.
        assert_eq!(take(&lim, 0, 50), Err(Duration::from_millis(10)));
    }

    #[test]
    fn retry_after_rounds_up() {
        let r = |ns| RateLimited {
            limit: Limit::Publish,
            retry_after: Duration::from_nanos(ns),
        };
        assert_eq!(r(0).retry_after_ms(), 1);
        assert_eq!(r(1).retry_after_ms(), 1);
        assert_eq!(r(1_000_000).retry_after_ms(), 1);
        assert_eq!(r(1_000_001).retry_after_ms(), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn strikes_count_in_fixed_windows() {
        let t0 = Instant::now();
        let mut s = Strikes::new(3, Duration::from_secs(10), t0);
        for i in 0..3 {
            assert!(!s.hit(t0 + Duration::from_secs(i)));
        }
        assert!(s.hit(t0 + Duration::from_secs(4)), "the 4th within 10 s is too many");
        // A new window starts over.
        let mut s = Strikes::new(3, Duration::from_secs(10), t0);
        for _ in 0..3 {
            assert!(!s.hit(t0));
        }
        assert!(!s.hit(t0 + Duration::from_secs(11)));
        assert!(!s.hit(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn namespaces_pick_the_room_limiter() {
        let mut cfg = LimitConfig {
            room_publish: Rate::new(100, 100),
            ..LimitConfig::default()
        };
        cfg.room_namespaces.insert("ann".into(), Rate::new(1, 1));
        cfg.room_namespaces.insert("free".into(), None);
        let limits = Limits::new(&cfg, true);
        let conn = limits.conn(Admit::none());
        let room = |s: &str| RoomId::parse(s).unwrap();
        let user = String::from("u");
        assert_eq!(namespace("ann:news"), Some("ann"));
        assert_eq!(namespace("general"), None);
        assert_eq!(namespace(":x"), Some(""));
        assert!(limits.rooms.for_room(&room("free:x")).is_none());
        assert!(limits.rooms.for_room(&room("general")).is_some());
        assert!(limits.rooms.for_room(&room("other:x")).is_some());
        assert!(limits.check_publish(&conn, &user, &room("ann:news")).is_ok());
        let conn = limits.conn(Admit::none());
        let e = limits.check_publish(&conn, &user, &room("ann:news")).unwrap_err();
        assert_eq!(e.limit, Limit::RoomPublish);
        // Another room of the namespace has its own bucket.
        let conn = limits.conn(Admit::none());
        assert!(limits.check_publish(&conn, &user, &room("ann:other")).is_ok());
    }

    #[test]
    fn disabled_limits_pass_everything_but_keep_the_address_cap() {
        let cfg = LimitConfig {
            addr_max_conns: 1,
            max_handshakes: 1,
            connects: Rate::new(1, 1),
            ..LimitConfig::default()
        };
        let limits = Limits::new(&cfg, false);
        let conn = limits.conn(Admit::none());
        for _ in 0..100 {
            assert!(conn.check_history().is_ok());
            assert!(conn.check_bytes(1 << 20).is_ok());
            assert!(
                limits
                    .check_publish(&conn, &"u".to_string(), &RoomId::parse("r").unwrap())
                    .is_ok()
            );
        }
        let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let first = limits.admit(&HeaderMap::new(), peer).expect("admitted");
        assert_eq!(limits.admit(&HeaderMap::new(), peer).err(), Some(Refusal::AddressConns));
        drop(first);
        assert!(limits.admit(&HeaderMap::new(), peer).is_ok());
        assert_eq!(
            limits.admission.addr_conns.len(),
            0,
            "entries go with the last connection"
        );
    }

    #[test]
    fn handshake_cap_counts_until_connect() {
        let cfg = LimitConfig {
            max_handshakes: 2,
            ..LimitConfig::default()
        };
        let limits = Limits::new(&cfg, true);
        let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let a = limits.admit(&HeaderMap::new(), peer).unwrap();
        let _b = limits.admit(&HeaderMap::new(), peer).unwrap();
        assert_eq!(limits.admit(&HeaderMap::new(), peer).err(), Some(Refusal::Handshakes));
        let mut conn = limits.conn(a);
        conn.handshake_done();
        assert!(limits.admit(&HeaderMap::new(), peer).is_ok());
        assert_eq!(limits.handshakes_peak(), 2);
        assert_eq!(Refusal::Handshakes.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Refusal::AddressConns.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn client_address_comes_from_the_right_most_forwarded_entry() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let xff = HeaderName::from_static("x-forwarded-for");
        let fwd = HeaderName::from_static("forwarded");
        let mut h = HeaderMap::new();
        h.insert(&xff, "1.1.1.1, 2.2.2.2".parse().unwrap());
        assert_eq!(client_ip(&h, peer, None), peer, "no header configured: the socket");
        assert_eq!(client_ip(&h, peer, Some(&xff)), "2.2.2.2".parse::<IpAddr>().unwrap());
        h.append(&xff, "3.3.3.3:4444".parse().unwrap());
        assert_eq!(client_ip(&h, peer, Some(&xff)), "3.3.3.3".parse::<IpAddr>().unwrap());
        h.insert(&xff, "[2001:db8::1]:80".parse().unwrap());
        assert_eq!(
            client_ip(&h, peer, Some(&xff)),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        h.insert(&xff, "garbage".parse().unwrap());
        assert_eq!(client_ip(&h, peer, Some(&xff)), peer, "unparsable: the socket");
        h.insert(
            &fwd,
            "for=1.1.1.1, for=\"[2001:db8::2]:9\";proto=https".parse().unwrap(),
        );
        assert_eq!(
            client_ip(&h, peer, Some(&fwd)),
            "2001:db8::2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(&HeaderMap::new(), peer, Some(&xff)), peer);
    }

    #[test]
    fn sweeping_drops_fresh_keys_and_resets_over_the_cap() {
        let mut cfg = LimitConfig {
            max_keys: 10,
            user_publish: Rate::new(1_000_000, 1),
            publish: None,
            room_publish: None,
            ..LimitConfig::default()
        };
        let limits = Limits::new(&cfg, true);
        let conn = limits.conn(Admit::none());
        let room = RoomId::parse("r").unwrap();
        for i in 0..50 {
            limits.check_publish(&conn, &format!("u{i}"), &room).unwrap();
        }
        assert_eq!(limits.keys(), 50);
        // Refill takes 1 microsecond: every key is fresh again.
        std::thread::sleep(Duration::from_millis(2));
        limits.sweep(true);
        assert_eq!(limits.keys(), 0);

        cfg.user_publish = Rate::new(1, 1);
        let limits = Limits::new(&cfg, true);
        for i in 0..50 {
            limits.check_publish(&conn, &format!("u{i}"), &room).unwrap();
        }
        limits.sweep(false);
        assert_eq!(limits.keys(), 0, "over the cap: reset");
    }

    #[test]
    fn a_connections_limiters_are_small() {
        let size = std::mem::size_of::<ConnLimits>();
        // 256 bytes on x86_64 when written: four limiters, the strikes window,
        // the guards; then 72 more for the history byte budget and the
        // per-limit retry times.
        assert!(size <= 336, "ConnLimits is {size} bytes");
    }
}
