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
//! Per-source shares (the source is the client address, or the trusted
//! proxy's forwarded address): no single address can keep the others out of
//! the two node-wide admission caps, yet one address alone (a big NAT, a
//! load test) still gets all of them while nobody else asks.
//! - Connection budget: half the budget's burst is kept for addresses within
//!   their share (`addr_budget`, a GCRA rate per address). An address past its
//!   share is admitted only while the budget holds more than that reserve, so
//!   under pressure it gets the leftovers and never the reserve.
//! - Handshake table: while it is full, a newcomer from an address holding
//!   fewer than `addr_max_handshakes` handshakes takes the place of the
//!   handshake that has been silent longest (no frame since the upgrade, and
//!   for at least `handshake_shed_after`): that one is closed with 4001. An
//!   address at its share, or a table with nobody to shed, gets 503.
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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use dashmap::DashMap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
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
    /// One address's share of `max_handshakes`: while the table is full, an
    /// address holding fewer may shed the oldest silent handshake; one holding
    /// this many gets 503. Default `max_handshakes / 10`, at least 16 (at
    /// most `max_handshakes`); 0 = no per-address share.
    pub addr_max_handshakes: usize,
    /// One address's share of `connects`: past it, an address is admitted only
    /// while the node budget holds more than half its burst. Default 1/10 of
    /// the rate and of the burst, each at least 10 (at most the node's); `None` = no share.
    pub addr_budget: Option<Rate>,
    /// How long a handshake must have been silent before a newcomer may shed it. Default 1 s.
    pub handshake_shed_after: Duration,
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
            addr_max_handshakes: handshake_share(1_000),
            addr_budget: Rate::new(2_000, 2_000).and_then(budget_share),
            handshake_shed_after: Duration::from_secs(1),
            max_keys: 100_000,
        }
    }
}

/// The default per-address share of a handshake cap: a tenth, at least 16,
/// at most the cap (0 when the cap is off).
pub fn handshake_share(max_handshakes: usize) -> usize {
    (max_handshakes / 10).max(16).min(max_handshakes)
}

/// The default per-address share of the node's connection budget: a tenth of
/// the rate and of the burst, each at least 10 and at most the node's.
pub fn budget_share(node: Rate) -> Option<Rate> {
    let tenth = |n: u32| (n / 10).max(10).min(n);
    Rate::new(tenth(node.per_sec), tenth(node.burst))
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

    /// Resolves once this connection's handshake has been shed to make room
    /// in a full table (the connection should then close with 4001); never
    /// for a connection without a place in the table.
    pub async fn handshake_shed(&self) {
        match &self.admit.handshake {
            Some(g) => {
                while g.slot.state.load(Ordering::Acquire) != SHED {
                    g.slot.wake.notified().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The client sent its first frame: its handshake is no longer silent and
    /// cannot be shed. False when it was shed already.
    pub fn handshake_spoke(&self) -> bool {
        self.admit.handshake.as_ref().is_none_or(|g| {
            g.slot
                .state
                .compare_exchange(WAITING, SPOKE, Ordering::AcqRel, Ordering::Acquire)
                .map_or_else(|now| now != SHED, |_| true)
        })
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

/// A handshake's place in the table, from admission until `connect` (or the
/// end of the connection).
struct HandshakeGuard {
    table: Arc<HandshakeTable>,
    slot: Arc<Slot>,
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        // A shed handshake's place already went to the newcomer that shed it.
        if self.slot.state.swap(DONE, Ordering::AcqRel) != SHED {
            self.table.count.fetch_sub(1, Ordering::Relaxed);
            if let Some(ip) = self.slot.ip {
                self.table.release_source(ip, self.table.now());
            }
        }
    }
}

/// Upgraded, no frame from the client yet: may be shed.
const WAITING: u8 = 0;
/// The client sent a frame (or a bearer token): no longer silent.
const SPOKE: u8 = 1;
/// Through `connect`, or the connection ended.
const DONE: u8 = 2;
/// Closed to make room for a newcomer.
const SHED: u8 = 3;

/// One handshake in the table; shared by its guard and the shedding queue.
struct Slot {
    state: AtomicU8,
    /// Admission time, ns since the table's base.
    since: u64,
    ip: Option<IpAddr>,
    /// Woken once when the slot is shed.
    wake: Notify,
}

/// What the node knows about one client address: its handshakes in
/// progress and its share of the connection budget (a GCRA theoretical
/// arrival time, ns since the table's base; at or before now = full share).
#[derive(Debug, Default, Clone, Copy)]
struct Source {
    handshakes: u32,
    tat: u64,
}

/// A GCRA in one atomic: `interval` ns per cell, at most `capacity` ns
/// (burst x interval) ahead of now.
struct Gcra {
    interval: u64,
    capacity: u64,
    tat: AtomicU64,
}

impl Gcra {
    fn new(rate: Rate) -> Self {
        let interval = (1_000_000_000 / u64::from(rate.per_sec.max(1))).max(1);
        Self {
            interval,
            capacity: interval.saturating_mul(u64::from(rate.burst.max(1))),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes one cell at `now` (ns) if `keep` more cells stay available
    /// after it; else how long until that would be so.
    fn take(&self, now: u64, keep: u64) -> Result<(), Duration> {
        let limit = self.capacity.saturating_sub(keep.saturating_mul(self.interval));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            let ahead = next - now;
            if ahead > limit {
                return Err(Duration::from_nanos(ahead - limit));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// How long from `now` until one cell could be taken leaving `keep` (0 = now).
    fn wait(&self, now: u64, keep: u64) -> Duration {
        let limit = self.capacity.saturating_sub(keep.saturating_mul(self.interval));
        let ahead = self.tat.load(Ordering::Relaxed).max(now) + self.interval - now;
        Duration::from_nanos(ahead.saturating_sub(limit))
    }

    /// How long from `now` until a source whose arrival time is `tat` is within its share.
    fn source_wait(&self, tat: u64, now: u64) -> Duration {
        Duration::from_nanos((tat.max(now) + self.interval - now).saturating_sub(self.capacity))
    }

    /// Whether a source whose arrival time is `tat` is within its share at `now`.
    fn allows(&self, tat: u64, now: u64) -> bool {
        tat.max(now) + self.interval - now <= self.capacity
    }

    /// Charges one cell to `tat`; a source past its share is charged down to
    /// an empty bucket, never into debt.
    fn charge(&self, tat: u64, now: u64) -> u64 {
        (tat.max(now) + self.interval).min(now + self.capacity)
    }
}

/// The handshakes in progress: a count under the cap, the per-address
/// counts, and the admission order for shedding.
struct HandshakeTable {
    /// 0 = no cap (then nothing is shed and nothing counted here).
    max: usize,
    per_source: usize,
    shed_after: u64,
    count: AtomicUsize,
    peak: AtomicUsize,
    /// Admission order; finished slots are dropped from the front and, when
    /// the queue grows past twice the cap, from everywhere.
    queue: Mutex<VecDeque<Arc<Slot>>>,
    sources: DashMap<IpAddr, Source>,
    base: std::time::Instant,
    shed_total: Counter,
}

impl HandshakeTable {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes a free place under the cap.
    fn try_reserve(&self) -> bool {
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back one handshake of `ip`; the entry goes when nothing is left in it.
    fn release_source(&self, ip: IpAddr, now: u64) {
        self.sources.remove_if_mut(&ip, |_, s| {
            s.handshakes = s.handshakes.saturating_sub(1);
            s.handshakes == 0 && s.tat <= now
        });
    }

    /// Sheds the oldest handshake that has been silent for at least
    /// `shed_after`: its place (and its count) passes to the caller. Returns
    /// the victim's address, or `None` when nobody may be shed.
    fn shed_oldest(&self, now: u64) -> Option<Option<IpAddr>> {
        let victim = {
            let mut q = self.queue.lock();
            while q.front().is_some_and(|s| s.state.load(Ordering::Acquire) >= DONE) {
                q.pop_front();
            }
            let at = q
                .iter()
                .take_while(|s| now.saturating_sub(s.since) >= self.shed_after)
                .position(|s| {
                    s.state
                        .compare_exchange(WAITING, SHED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                })?;
            q.remove(at)?
        };
        victim.wake.notify_one();
        self.shed_total.increment(1);
        if let Some(ip) = victim.ip {
            self.release_source(ip, now);
        }
        Some(victim.ip)
    }

    fn push(&self, slot: Arc<Slot>) {
        let mut q = self.queue.lock();
        q.push_back(slot);
        if q.len() > 2 * self.max + 64 {
            q.retain(|s| s.state.load(Ordering::Acquire) < DONE);
        }
    }
}

/// Gives a reserved place back unless the admission went through.
struct Reserved<'a>(Option<&'a AtomicUsize>);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
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
    budget: Option<Gcra>,
    /// Cells of `budget` kept for addresses within their share.
    budget_reserve: u64,
    /// One address's share of `budget`: only its interval and capacity are
    /// used; each address's arrival time lives in its [`Source`].
    budget_share: Option<Gcra>,
    table: Arc<HandshakeTable>,
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
                budget: on(cfg.connects).map(Gcra::new),
                budget_reserve: on(cfg.connects).map_or(0, |r| u64::from(r.burst / 2)),
                budget_share: on(cfg.connects).and(on(cfg.addr_budget)).map(Gcra::new),
                table: Arc::new(HandshakeTable {
                    max: if enabled { cfg.max_handshakes } else { 0 },
                    per_source: cfg.addr_max_handshakes,
                    shed_after: u64::try_from(cfg.handshake_shed_after.as_nanos()).unwrap_or(u64::MAX),
                    count: AtomicUsize::new(0),
                    peak: AtomicUsize::new(0),
                    queue: Mutex::new(VecDeque::new()),
                    sources: DashMap::new(),
                    base: std::time::Instant::now(),
                    shed_total: metrics::handshakes_shed(),
                }),
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
        let t = &a.table;
        let now = t.now();
        let shares = t.max > 0 || a.budget_share.is_some();
        let needs_ip = shares || a.addr_max_conns > 0 || a.addr_rate.is_some();
        let ip = needs_ip.then(|| client_ip(headers, peer.ip(), a.proxy_header.as_ref()));
        // The address's standing, read without inserting anything.
        let source = match ip {
            Some(ip) if shares => t.sources.get(&ip).map(|s| *s).unwrap_or_default(),
            _ => Source::default(),
        };
        let mut admit = Admit::default();
        let mut reserved = Reserved(None);
        let mut must_shed = false;
        if t.max > 0 {
            if t.try_reserve() {
                reserved = Reserved(Some(&t.count));
            } else if t.per_source > 0 && source.handshakes as usize >= t.per_source {
                return Err(Refusal::Handshakes);
            } else {
                must_shed = true;
            }
        }
        if let Some(ip) = ip {
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
        let within_share = a.budget_share.as_ref().is_none_or(|g| g.allows(source.tat, now));
        if let Some(budget) = &a.budget {
            let keep = if within_share { 0 } else { a.budget_reserve };
            budget.take(now, keep).map_err(|d| match &a.budget_share {
                // Past its share: retry when the budget is above the reserve
                // again, or when the share is back and the budget has a cell.
                Some(share) if !within_share => {
                    Refusal::Budget(d.min(share.source_wait(source.tat, now).max(budget.wait(now, 0))))
                }
                _ => Refusal::Budget(d),
            })?;
        }
        // Admitted: from here on nothing refuses but an empty shedding queue.
        if must_shed && t.shed_oldest(now).is_none() {
            return Err(Refusal::Handshakes);
        }
        if let (Some(ip), true) = (ip, shares) {
            let mut s = t.sources.entry(ip).or_default();
            if t.max > 0 {
                s.handshakes += 1;
            }
            if let Some(g) = &a.budget_share {
                s.tat = g.charge(s.tat, now);
            }
        }
        if t.max > 0 {
            std::mem::forget(reserved);
            // A bearer token is a credential: such a handshake is not silent.
            let state = if headers.contains_key(AUTHORIZATION) {
                SPOKE
            } else {
                WAITING
            };
            let slot = Arc::new(Slot {
                state: AtomicU8::new(state),
                since: now,
                ip: ip.filter(|_| shares),
                wake: Notify::new(),
            });
            t.push(slot.clone());
            admit.handshake = Some(HandshakeGuard { table: t.clone(), slot });
            t.peak.fetch_max(t.count.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(admit)
    }

    /// Upgrades admitted and not yet through `connect`, right now.
    pub fn handshakes_in_progress(&self) -> usize {
        self.admission.table.count.load(Ordering::Relaxed)
    }

    /// The most handshakes ever in progress at once (never above the cap).
    pub fn handshakes_peak(&self) -> usize {
        self.admission.table.peak.load(Ordering::Relaxed)
    }

    /// Keys held by all keyed limiters (user, room, address).
    pub fn keys(&self) -> usize {
        let user = self.user.as_ref().map_or(0, |k| k.inner.read().len());
        let rooms: usize = self.rooms.all().map(|k| k.inner.read().len()).sum();
        let addr = self.admission.addr_rate.as_ref().map_or(0, |k| k.inner.read().len());
        user + rooms + addr + self.admission.addr_conns.len() + self.admission.table.sources.len()
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
        let mut keys = self.admission.addr_conns.len() + self.sweep_sources(shrink);
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

impl Limits {
    /// Drops address entries with no handshake and a full budget share; past
    /// `max_keys`, also those with a spent share (they start fresh). Returns
    /// the entries left.
    fn sweep_sources(&self, shrink: bool) -> usize {
        let t = &self.admission.table;
        let now = t.now();
        t.sources.retain(|_, s| s.handshakes > 0 || s.tat > now);
        if t.sources.len() > self.max_keys {
            t.sources.retain(|_, s| s.handshakes > 0);
            self.metrics.resets.increment(1);
        }
        if shrink {
            t.sources.shrink_to_fit();
        }
        t.sources.len()
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
    fn the_budget_keeps_a_reserve_for_addresses_within_their_share() {
        let g = Gcra::new(Rate::new(10, 10).unwrap());
        let ms = |n: u64| n * 1_000_000;
        // Past its share an address may take cells only while 5 stay.
        for _ in 0..5 {
            assert_eq!(g.take(0, 5), Ok(()));
        }
        assert_eq!(g.take(0, 5), Err(Duration::from_millis(100)));
        // Within its share it may take the reserve, down to the last cell.
        for _ in 0..5 {
            assert_eq!(g.take(0, 0), Ok(()));
        }
        assert_eq!(g.take(0, 0), Err(Duration::from_millis(100)));
        assert_eq!(g.wait(0, 0), Duration::from_millis(100));
        assert_eq!(g.take(ms(100), 0), Ok(()));

        // A source's share: 2 cells, one every 500 ms; charged down to empty, never into debt.
        let share = Gcra::new(Rate::new(2, 2).unwrap());
        let mut tat = 0;
        for _ in 0..5 {
            tat = share.charge(tat, 0);
        }
        assert!(!share.allows(tat, 0));
        assert_eq!(share.source_wait(tat, 0), Duration::from_millis(500));
        assert!(share.allows(tat, ms(500)));
    }

    fn shed_config(max: usize, per_source: usize) -> LimitConfig {
        LimitConfig {
            max_handshakes: max,
            addr_max_handshakes: per_source,
            handshake_shed_after: Duration::ZERO,
            trusted_proxy_header: Some(HeaderName::from_static("x-forwarded-for")),
            ..LimitConfig::default()
        }
    }

    fn from(ip: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", ip.parse().unwrap());
        h
    }

    #[test]
    fn a_full_table_sheds_the_oldest_silent_handshake_for_an_address_under_its_share() {
        let limits = Limits::new(&shed_config(3, 2), true);
        let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let a1 = limits.conn(limits.admit(&from("1.1.1.1"), peer).unwrap());
        let a2 = limits.conn(limits.admit(&from("1.1.1.1"), peer).unwrap());
        let b1 = limits.conn(limits.admit(&from("2.2.2.2"), peer).unwrap());
        // a1 spoke (its `connect` is being verified): not silent, not shed.
        assert!(a1.handshake_spoke());
        // Full; 1.1.1.1 holds its share of 2: refused.
        assert_eq!(limits.admit(&from("1.1.1.1"), peer).err(), Some(Refusal::Handshakes));
        // 3.3.3.3 holds none: a2, the oldest silent one, makes room.
        let c1 = limits.conn(limits.admit(&from("3.3.3.3"), peer).unwrap());
        assert!(!a2.handshake_spoke(), "a2 was shed");
        assert!(b1.handshake_spoke());
        assert!(c1.handshake_spoke());
        assert_eq!(limits.handshakes_in_progress(), 3);
        let t = &limits.admission.table;
        assert_eq!(t.sources.get(&"1.1.1.1".parse().unwrap()).unwrap().handshakes, 1);
        // Nobody silent is left: the next newcomer is refused.
        assert_eq!(limits.admit(&from("4.4.4.4"), peer).err(), Some(Refusal::Handshakes));
        // The shed guard does not give its place back twice.
        drop(a2);
        assert_eq!(limits.handshakes_in_progress(), 3);
        drop((a1, b1, c1));
        assert_eq!(limits.handshakes_in_progress(), 0);
        assert_eq!(limits.handshakes_peak(), 3);
        assert!(t.sources.iter().all(|s| s.handshakes == 0));
        limits.sweep(true);
        assert!(t.sources.is_empty() || limits.admission.budget_share.is_some());
    }

    #[test]
    fn a_handshake_with_a_bearer_token_is_not_silent() {
        let limits = Limits::new(&shed_config(1, 0), true);
        let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let mut h = from("1.1.1.1");
        h.insert(AUTHORIZATION, "Bearer x".parse().unwrap());
        let _a = limits.admit(&h, peer).unwrap();
        assert_eq!(limits.admit(&from("2.2.2.2"), peer).err(), Some(Refusal::Handshakes));
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
