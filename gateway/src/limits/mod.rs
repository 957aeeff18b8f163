//! Rate limits: every budget the node enforces on a connection's commands,
//! and the façade the node holds ([`Limits`]).
//!
//! Owns, all GCRA limiters from `governor` (primitives in [`rate`]):
//! - per connection ([`ConnLimits`]): publishes, rooms subscribed per second,
//!   `history` requests, bytes of client frames, the history byte budget;
//!   plus the count of `rate_limited` replies that turns repeated abuse into
//!   close 4008;
//! - shared by the node ([`Limits`]): publishes per user (across that user's
//!   connections on this node) and per room, the room limit chosen by the
//!   room's namespace (the name before its first `:`);
//! - the HTTP edge of admission: [`Limits::admit`] reads the client address
//!   ([`client_ip`]) and credential from the request headers and hands them
//!   to [`admission`], which decides without HTTP types; [`Refusal::status`]
//!   is the HTTP answer to a refusal.
//!
//! Does not own admission decisions (budgets, handshake table, shedding: in
//! [`admission`]), the connection-count cap (`max_connections`, in `conn`),
//! nor the replies (the connection task turns a [`RateLimited`] into the wire
//! error).
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

pub mod admission;
pub mod rate;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ::metrics::{Counter, Gauge};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use tokio::time::Instant;

use crate::limits::admission::Admission;
pub use crate::limits::admission::{Admit, Applicant, Refusal};
use crate::limits::rate::Keyed;
pub use crate::limits::rate::{DirectLimiter, Rate, retry_after_secs, take};
use crate::metrics;
use crate::rooms::RoomId;

/// How often keyed state is pruned.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Keyed maps are shrunk (memory handed back) every this many sweeps.
const SHRINK_EVERY: u32 = 15;

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
        self.admit.handshake_done();
    }

    /// Resolves once this connection's handshake has been shed to make room
    /// in a full table (the connection should then close with 4001); never
    /// for a connection without a place in the table.
    pub async fn handshake_shed(&self) {
        self.admit.shed().await;
    }

    /// The client sent its first frame: its handshake is no longer silent and
    /// cannot be shed. False when it was shed already.
    pub fn handshake_spoke(&self) -> bool {
        self.admit.spoke()
    }
}

fn limited(limit: Limit, retry_after: Duration) -> RateLimited {
    RateLimited { limit, retry_after }
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

struct LimitMetrics {
    rate_limited: [Counter; 6],
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
    /// Header with the client address set by a trusted proxy.
    proxy_header: Option<HeaderName>,
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
            admission: Admission::new(
                on(cfg.connects),
                on(cfg.addr_budget),
                if enabled { cfg.max_handshakes } else { 0 },
                cfg.addr_max_handshakes,
                cfg.handshake_shed_after,
                cfg.addr_max_conns,
                on(cfg.addr_connects),
            ),
            proxy_header: cfg.trusted_proxy_header.clone(),
            max_keys: cfg.max_keys,
            metrics: LimitMetrics {
                rate_limited: Limit::ALL.map(|l| metrics::rate_limited(l.label())),
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

    /// Admission control for an upgrade request from `peer`, before the
    /// upgrade (see [`admission`]). Cheap: atomics, at most two map entries,
    /// no allocation on refusal.
    pub fn admit(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Admit, Refusal> {
        self.admission.admit(&Upgrade {
            headers,
            peer,
            proxy_header: self.proxy_header.as_ref(),
        })
    }

    /// Upgrades admitted and not yet through `connect`, right now.
    pub fn handshakes_in_progress(&self) -> usize {
        self.admission.handshakes_in_progress()
    }

    /// The most handshakes ever in progress at once (never above the cap).
    pub fn handshakes_peak(&self) -> usize {
        self.admission.handshakes_peak()
    }

    /// Keys held by all keyed limiters (user, room, address).
    pub fn keys(&self) -> usize {
        let user = self.user.as_ref().map_or(0, Keyed::len);
        let rooms: usize = self.rooms.all().map(Keyed::len).sum();
        user + rooms + self.admission.keys()
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
        let conns = self.admission.addr_conns();
        let (sources, reset) = self.admission.sweep_sources(self.max_keys, shrink);
        if reset {
            self.metrics.resets.increment(1);
        }
        let mut keys = conns + sources;
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
        if let Some(k) = self.admission.addr_rate() {
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

impl Refusal {
    /// The HTTP status of the refusal: 503 when the node is busy, 429 when
    /// this address asks too much.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Budget(_) | Refusal::Handshakes => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::AddressConns | Refusal::AddressRate(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// An upgrade request as admission sees it.
struct Upgrade<'a> {
    headers: &'a HeaderMap,
    peer: SocketAddr,
    proxy_header: Option<&'a HeaderName>,
}

impl Applicant for Upgrade<'_> {
    fn ip(&self) -> IpAddr {
        client_ip(self.headers, self.peer.ip(), self.proxy_header)
    }

    fn has_credential(&self) -> bool {
        self.headers.contains_key(AUTHORIZATION)
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
