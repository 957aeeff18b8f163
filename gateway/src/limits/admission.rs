//! Admission control: whether an upgrade request may become a connection,
//! decided before the WebSocket upgrade.
//!
//! Owns a node-wide budget of new connections per second, the cap on
//! handshakes in progress (upgraded, not yet through `connect`), the optional
//! per-address caps, and the guards an admitted connection holds ([`Admit`]).
//! A refusal is a [`Refusal`]; the caller answers it (503 or 429 with
//! `Retry-After`), so a reconnect storm is served at a steady rate.
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
//! Does not own HTTP: it never sees headers or status codes. The request is
//! read through [`Applicant`] (client address, whether it carries a
//! credential); `limits` implements that for an HTTP request and maps a
//! [`Refusal`] to a status. Does not own per-command rate limits (`limits`)
//! nor the connection-count cap (`max_connections`, in `conn`).
//!
//! Concurrency: the budget is one atomic GCRA; the handshake count is an
//! atomic under the cap; per-address state lives in sharded maps; the
//! shedding queue is a mutex held only to push or pick a victim, never across
//! `.await`. A slot's state is one atomic (waiting, spoke, done, shed), so a
//! handshake is shed at most once and its place is given back exactly once.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ::metrics::Counter;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::limits::rate::{Keyed, Rate, retry_after_secs};
use crate::metrics;

/// What admission reads from a request: implemented by the HTTP side, so
/// this module stays free of HTTP types.
pub trait Applicant {
    /// The client's address (read only when a per-address limit needs it).
    fn ip(&self) -> IpAddr;
    /// Whether the request carries a credential (a bearer token): such a
    /// handshake is not silent and is never shed.
    fn has_credential(&self) -> bool;
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

    pub(super) fn index(self) -> usize {
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

    /// The connection got through `connect`: it no longer counts as a handshake in progress.
    pub(super) fn handshake_done(&mut self) {
        self.handshake = None;
    }

    /// Resolves once this connection's handshake has been shed to make room
    /// in a full table; never for a connection without a place in the table.
    pub(super) async fn shed(&self) {
        match &self.handshake {
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
    pub(super) fn spoke(&self) -> bool {
        self.handshake.as_ref().is_none_or(|g| {
            g.slot
                .state
                .compare_exchange(WAITING, SPOKE, Ordering::AcqRel, Ordering::Acquire)
                .map_or_else(|now| now != SHED, |_| true)
        })
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

/// Admission state of the node: the budget, its per-address share, the
/// handshake table and the per-address caps.
pub(super) struct Admission {
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
    /// Refusals counted per [`Refusal::index`].
    refused: [Counter; 4],
}

impl Admission {
    /// Admission with the node budget `connects` and one address's share of
    /// it `addr_budget` (both `None` when off), a handshake cap `max_handshakes`
    /// (0 = off) with an address's share `addr_max_handshakes`, the silence
    /// after which a handshake may be shed, and the per-address caps.
    pub(super) fn new(
        connects: Option<Rate>,
        addr_budget: Option<Rate>,
        max_handshakes: usize,
        addr_max_handshakes: usize,
        handshake_shed_after: Duration,
        addr_max_conns: usize,
        addr_connects: Option<Rate>,
    ) -> Self {
        Admission {
            budget: connects.map(Gcra::new),
            budget_reserve: connects.map_or(0, |r| u64::from(r.burst / 2)),
            budget_share: connects.and(addr_budget).map(Gcra::new),
            table: Arc::new(HandshakeTable {
                max: max_handshakes,
                per_source: addr_max_handshakes,
                shed_after: u64::try_from(handshake_shed_after.as_nanos()).unwrap_or(u64::MAX),
                count: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                queue: Mutex::new(VecDeque::new()),
                sources: DashMap::new(),
                base: std::time::Instant::now(),
                shed_total: metrics::handshakes_shed(),
            }),
            addr_max_conns,
            addr_conns: Arc::new(DashMap::new()),
            addr_rate: addr_connects.map(Keyed::new),
            refused: [
                Refusal::Budget(Duration::ZERO),
                Refusal::Handshakes,
                Refusal::AddressConns,
                Refusal::AddressRate(Duration::ZERO),
            ]
            .map(|r| metrics::admission_refused(r.label())),
        }
    }

    /// Admission control for one upgrade request, before the upgrade.
    /// Cheap: atomics, at most two map entries, no allocation on refusal.
    pub(super) fn admit(&self, who: &impl Applicant) -> Result<Admit, Refusal> {
        let r = self.admit_inner(who);
        if let Err(refusal) = r {
            self.refused[refusal.index()].increment(1);
        }
        r
    }

    fn admit_inner(&self, who: &impl Applicant) -> Result<Admit, Refusal> {
        let a = self;
        let t = &a.table;
        let now = t.now();
        let shares = t.max > 0 || a.budget_share.is_some();
        let needs_ip = shares || a.addr_max_conns > 0 || a.addr_rate.is_some();
        let ip = needs_ip.then(|| who.ip());
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
            let state = if who.has_credential() { SPOKE } else { WAITING };
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
    pub(super) fn handshakes_in_progress(&self) -> usize {
        self.table.count.load(Ordering::Relaxed)
    }

    /// The most handshakes ever in progress at once (never above the cap).
    pub(super) fn handshakes_peak(&self) -> usize {
        self.table.peak.load(Ordering::Relaxed)
    }

    /// Keys held for addresses: rate limiter, connection counts, sources.
    pub(super) fn keys(&self) -> usize {
        self.addr_rate.as_ref().map_or(0, Keyed::len) + self.addr_conns.len() + self.table.sources.len()
    }

    /// Open-connection counts held, one per address.
    pub(super) fn addr_conns(&self) -> usize {
        self.addr_conns.len()
    }

    /// The per-address rate limiter, if on (swept with the other keyed limiters).
    pub(super) fn addr_rate(&self) -> Option<&Keyed<IpAddr>> {
        self.addr_rate.as_ref()
    }

    /// Drops address entries with no handshake and a full budget share; past
    /// `max_keys`, also those with a spent share (they start fresh). Returns
    /// the entries left and whether that reset happened.
    pub(super) fn sweep_sources(&self, max_keys: usize, shrink: bool) -> (usize, bool) {
        let t = &self.table;
        let now = t.now();
        t.sources.retain(|_, s| s.handshakes > 0 || s.tat > now);
        let reset = t.sources.len() > max_keys;
        if reset {
            t.sources.retain(|_, s| s.handshakes > 0);
        }
        if shrink {
            t.sources.shrink_to_fit();
        }
        (t.sources.len(), reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{LimitConfig, Limits};
    use crate::rooms::RoomId;
    use axum::http::header::AUTHORIZATION;
    use axum::http::{HeaderMap, HeaderName, StatusCode};
    use std::net::SocketAddr;

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
}
