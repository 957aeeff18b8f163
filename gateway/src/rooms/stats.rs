//! A room's figures for `/metrics`: counters beside each room's lock and the
//! read-only ranking of the busiest rooms.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::RoomIndex;
use crate::model::RoomId;

/// Length of one ranking window of [`RoomIndex::top_rooms`], seconds.
pub const RANK_WINDOW_SECS: u64 = 30;

/// The current ranking window: whole [`RANK_WINDOW_SECS`] since the process
/// started.
pub(super) fn rank_window() -> u64 {
    now_ms() / 1000 / RANK_WINDOW_SECS
}

/// Milliseconds since the first call in this process (a monotonic clock).
fn now_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    START.elapsed().as_millis() as u64
}

/// A room's figures for `/metrics`: written under the room's lock (one
/// writer at a time), read by scrapes without it (each figure may be a moment
/// older than another; never torn).
#[derive(Debug, Default)]
pub struct RoomCounters {
    /// Local members, notify mode included.
    pub(super) members: AtomicUsize,
    /// Messages fanned out on this node since the room's state exists.
    pub(super) messages: AtomicU64,
    /// Deliveries (members a message was queued for, notify members included).
    pub(super) deliveries: AtomicU64,
    /// The ranking window `window_deliveries` counts in, and the count of the
    /// window before it (0 if the room was idle then).
    pub(super) window: AtomicU64,
    pub(super) window_deliveries: AtomicU64,
    pub(super) previous_window_deliveries: AtomicU64,
    /// When the room last fanned out a message, ms on this process's
    /// monotonic clock (0: never); which rooms `budget` evicts first.
    pub(super) last_active_ms: AtomicU64,
}

impl RoomCounters {
    /// Counts one message fanned out to `delivered` members. Under the room's lock.
    pub(super) fn record(&self, delivered: usize) {
        let delivered = delivered as u64;
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(delivered, Ordering::Relaxed);
        let ms = now_ms();
        self.last_active_ms.store(ms, Ordering::Relaxed);
        let now = ms / 1000 / RANK_WINDOW_SECS;
        let w = self.window.load(Ordering::Relaxed);
        if w != now {
            let last = self.window_deliveries.load(Ordering::Relaxed);
            let previous = if w + 1 == now { last } else { 0 };
            self.previous_window_deliveries.store(previous, Ordering::Relaxed);
            self.window_deliveries.store(0, Ordering::Relaxed);
            self.window.store(now, Ordering::Relaxed);
        }
        self.window_deliveries.fetch_add(delivered, Ordering::Relaxed);
    }

    /// Deliveries in the current and the previous ranking window, as of `now`.
    pub(super) fn recent(&self, now: u64) -> u64 {
        let w = self.window.load(Ordering::Relaxed);
        let current = self.window_deliveries.load(Ordering::Relaxed);
        if w == now {
            current + self.previous_window_deliveries.load(Ordering::Relaxed)
        } else if w + 1 == now {
            current
        } else {
            0
        }
    }
}

/// One room's figures for `/metrics` (see [`RoomIndex::top_rooms`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomStat {
    pub room: RoomId,
    pub members: usize,
    pub messages: u64,
    pub deliveries: u64,
    /// Deliveries in the current and the previous ranking window.
    pub recent: u64,
}

impl RoomStat {
    pub(super) fn rank(&self) -> (u64, usize) {
        (self.recent, self.members)
    }
}

/// Ranks by (recent deliveries, members); the heap's top is the least.
struct Ranked(RoomStat);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.0.rank() == other.0.rank()
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.0.rank().cmp(&self.0.rank())
    }
}

/// The sums over every room not shown by name on `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OtherRooms {
    pub rooms: usize,
    pub members: usize,
    pub messages: u64,
    pub deliveries: u64,
}

impl OtherRooms {
    pub(super) fn add(&mut self, members: usize, messages: u64, deliveries: u64) {
        self.rooms += 1;
        self.members += members;
        self.messages += messages;
        self.deliveries += deliveries;
    }
}

/// What `/metrics` shows of rooms: the top rooms by name, and the rest summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomMetrics {
    /// Busiest first.
    pub top: Vec<RoomStat>,
    pub other: OtherRooms,
}

impl RoomIndex {
    /// The at most `n` rooms that `shown` allows with the most deliveries in
    /// the current and previous ranking window ([`RANK_WINDOW_SECS`] each,
    /// so 30 to 60 s of traffic), then the most members, with their counters;
    /// every other room (not allowed, idle, or below the top `n`) is summed in
    /// [`RoomMetrics::other`], so series still add up to the node's rooms.
    /// Rooms without members or recent traffic are never shown by name.
    ///
    /// Read-only and lock-free per room: it reads each room's atomics under
    /// the map's shard read guards, clones only the names of the top `n`,
    /// and changes nothing, so any number of scrapers see the same ranking.
    pub fn top_rooms(&self, n: usize, shown: impl Fn(&str) -> bool) -> RoomMetrics {
        let now = rank_window();
        let mut out = RoomMetrics::default();
        let mut heap = std::collections::BinaryHeap::with_capacity(n + 1);
        for entry in &self.rooms {
            let c = &entry.value().stats;
            let members = c.members.load(Ordering::Relaxed);
            let messages = c.messages.load(Ordering::Relaxed);
            let deliveries = c.deliveries.load(Ordering::Relaxed);
            let recent = c.recent(now);
            let candidate = n > 0 && (members > 0 || recent > 0) && shown(entry.key().as_str());
            // Only a room that beats the least of a full top is worth its name's clone.
            let beats = heap.len() < n
                || heap
                    .peek()
                    .is_some_and(|Ranked(least): &Ranked| (recent, members) > least.rank());
            if !(candidate && beats) {
                out.other.add(members, messages, deliveries);
                continue;
            }
            heap.push(Ranked(RoomStat {
                room: entry.key().clone(),
                members,
                messages,
                deliveries,
                recent,
            }));
            if heap.len() > n
                && let Some(Ranked(out_of_top)) = heap.pop()
            {
                out.other
                    .add(out_of_top.members, out_of_top.messages, out_of_top.deliveries);
            }
        }
        out.top = heap.into_iter().map(|Ranked(r)| r).collect();
        out.top.sort_unstable_by_key(|r| std::cmp::Reverse(r.rank()));
        out
    }
}

/// The `room` label of the series summing every room not shown by name.
pub const OTHER_ROOMS: &str = "_other";

/// Appends the per-room series [`RoomIndex::top_rooms`] chose, in the
/// Prometheus text format: one series per room shown by name (at most
/// `--room-metrics-top`, only rooms matching `--room-metrics-rooms`), and one
/// with `room="_other"` summing every other room, so the sum over `room` is the
/// node's total. A room's counters are its own since its state was created on
/// this node; `_other`'s move as rooms enter or leave the top or are dropped.
/// Room names need no escaping (`A-Z a-z 0-9 _ - :`).
pub fn render(out: &mut String, rooms: &RoomMetrics) {
    use std::fmt::Write as _;
    type Family = (&'static str, &'static str, &'static str, fn(&RoomStat) -> u64);
    let families: [Family; 3] = [
        (
            "gateway_room_members",
            "gauge",
            "Local members of the room (rooms shown by name: the busiest allowed by --room-metrics-rooms; _other: the rest)",
            |r| r.members as u64,
        ),
        (
            "gateway_room_messages_total",
            "counter",
            "Messages fanned out in the room on this node",
            |r| r.messages,
        ),
        (
            "gateway_room_deliveries_total",
            "counter",
            "Deliveries (message x member) in the room on this node",
            |r| r.deliveries,
        ),
    ];
    let other = RoomStat {
        room: RoomId::parse(OTHER_ROOMS).expect("a valid room name"),
        members: rooms.other.members,
        messages: rooms.other.messages,
        deliveries: rooms.other.deliveries,
        recent: 0,
    };
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for r in rooms.top.iter().chain([&other]) {
            let _ = writeln!(out, "{name}{{room=\"{}\"}} {}", r.room, value(r));
        }
    }
}
