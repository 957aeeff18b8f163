//! Per-node room state: local members, the recent-message log, offsets and
//! publish de-duplication.
//!
//! Owns local membership and the per-room log that serves `since` recovery and
//! `history`. Does not own sockets (`conn` drains outboxes) or cross-node
//! routing (`broker`).
//!
//! Files: `members` (member sets, notify-mode counts, the broadcast),
//! `log` (the recent log: publish, de-duplication, catch-up, history),
//! `sequencer` (cluster mode: ordering, gaps, repair bookkeeping), `events`
//! (the broker's interface, `broker::events`, implemented: the broker reports
//! and asks through it and never names this module), `presence` (changed
//! rooms for presence), `stats` (figures for `/metrics`), `budget` (the
//! node-wide bounds: stored history bytes and the room count).
//!
//! Invariants:
//! - A conn is in a room at most once; the first and last local member of a
//!   room are each reported exactly once ([`Transition`]).
//! - Within a room, frames reach every member in offset order: a message is
//!   appended to the log and offered to members under the room's lock, and a
//!   joiner's catch-up is read under that same lock, so catch-up and live
//!   messages neither overlap nor leave a gap.
//! - A message is stored once ([`SharedMessage`]): its push is encoded at
//!   most once per codec, and the log, every member of that codec, catch-up
//!   and history share those bytes.
//!
//! Concurrency: a `DashMap` from name to `Arc<Room>`; the map's shard guard is
//! released before the room's own mutex is taken, and no lock is held across
//! `.await`. A room's figures for `/metrics` are atomics beside its mutex
//! ([`RoomCounters`]), written under the mutex and read without it, so a
//! scrape ([`RoomIndex::top_rooms`]) takes no room lock and changes nothing. Broadcasts never block: full outboxes overflow and their writers
//! close those connections as slow consumers.

mod budget;
mod events;
mod log;
mod members;
mod presence;
mod sequencer;
mod stats;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fanout_tree::{Flushers, MemberSet, Outbox, TreeConfig, TreeTier};
use parking_lot::Mutex;

pub use crate::broker::events::{Catchup, Delivered, Gap, Published};
pub use crate::error::RoomError;
pub use crate::model::{ConnId, RoomId};
pub use crate::protocol::SharedMessage;
pub use crate::transport::ws::Frame;
pub use members::{Activity, Member, MemberSlot};
pub use presence::LocalPresence;
pub use stats::{
    OTHER_ROOMS, OtherRooms, RANK_WINDOW_SECS, RoomCounters, RoomMetrics, RoomStat, render as render_metrics,
};

/// A connection's outbox.
pub type ConnOutbox = Arc<Outbox<Frame>>;

/// The first/last local member transitions of a room; they drive the room's
/// bus subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    FirstLocal,
    LastLocal,
    Unchanged,
}

/// Limits of the room state.
#[derive(Debug, Clone)]
pub struct RoomLimits {
    /// Messages kept per room for `since` and `history`.
    pub history_size: usize,
    /// Bytes of encoded (JSON) frames kept per room.
    pub history_max_bytes: usize,
    /// Bytes of stored history across every room of the node; over it the
    /// least recently active rooms' histories are dropped (`budget`).
    pub history_total_bytes: usize,
    /// How long a publish `key` is remembered (embedded bus).
    pub dedup_window: Duration,
    /// Most keys remembered per room (embedded bus).
    pub dedup_max_keys: usize,
    /// Most rooms with state on the node.
    pub max_rooms: usize,
    /// Most out-of-order messages buffered per room while it syncs.
    pub max_pending: usize,
    /// Flushers writing broadcast frames (one per core is the default).
    pub fanout_shards: usize,
    /// When a room's fan-out is split into shards across cores, and how
    /// (`--tree-threshold`, `--tree-degree`).
    pub tree: TreeConfig,
}

/// Who assigns offsets: this node's log (embedded) or the cluster's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// The room log on this node is the source of truth; rooms are live at once.
    Authoritative,
    /// The log is a cache of a JetStream stream; a room is live once the bus
    /// has subscribed and learnt its latest offset.
    Cache,
}

/// What a join did.
#[derive(Debug)]
pub struct Joined {
    pub transition: Transition,
    /// The full membership's slot (keep it to leave or switch modes); `None`
    /// in notify mode and while joining.
    pub slot: Option<MemberSlot>,
    /// The room's latest offset when the membership took effect, and the
    /// catch-up for `since`; `None` while the room is not live yet (then ask
    /// [`RoomIndex::live_from`] once the bus made it live).
    pub at: Option<(u64, Option<Catchup>)>,
}

/// A page of `history`.
#[derive(Debug)]
pub enum HistoryPage {
    /// Oldest first; `more` when older messages remain.
    Messages {
        messages: Vec<SharedMessage>,
        more: bool,
    },
    NeedsBackend,
}

/// A stored message and its offset (kept beside it for the log's binary
/// searches).
#[derive(Debug, Clone)]
struct Entry {
    offset: u64,
    msg: SharedMessage,
}

struct RoomState {
    /// Members that get every message, by codec (JSON, `gw.v1.proto`): each
    /// message is encoded once per codec for all of them.
    plain: [MemberSet<ConnId, Frame>; 2],
    /// Members that negotiated `permessage-deflate`, by codec: each message
    /// is compressed once per codec for all of them. Made by the first such
    /// member, dropped with the last. [`members::FullSet`] names all four.
    deflated: Option<Box<[MemberSet<ConnId, Frame>; 2]>>,
    /// Members in notify mode.
    watchers: HashMap<ConnId, Arc<Activity>, foldhash::fast::RandomState>,
    /// Connections that hold the room while they wait on the broker
    /// ([`Member::Joining`]); they receive nothing.
    joining: HashSet<ConnId, foldhash::fast::RandomState>,
    log: VecDeque<Entry>,
    log_bytes: usize,
    last_offset: u64,
    /// The log holds every message in `(evicted_upto, last_offset]`.
    evicted_upto: u64,
    /// Messages at or below this offset may be gone for good: evicted from
    /// the authoritative log, or (cache mode) dropped by the stream before
    /// this node read them. Never above `evicted_upto`; the log holds the
    /// room's whole history when both are equal.
    gone_upto: u64,
    /// Receiving messages in order (cache mode: subscribed and synced).
    live: bool,
    /// The offset the room went live at.
    live_from: u64,
    /// Messages that arrived ahead of a gap or before going live: seq -> (previous seq of the room, message).
    pending: BTreeMap<u64, (u64, SharedMessage)>,
    /// Highest offset dropped from `pending` for lack of room; the repair fetches it.
    pending_dropped: u64,
    /// A repair (gap fetch) is under way.
    repairing: bool,
    dedup: HashMap<Box<str>, u64>,
    dedup_order: VecDeque<(Instant, Box<str>)>,
    /// Removed from the index; a caller holding an old `Arc` must look again.
    dead: bool,
    /// The room's figures for `/metrics`, shared with its [`Room`].
    stats: Arc<RoomCounters>,
    /// Its membership changed since presence last read it (the room is in
    /// [`RoomIndex`]'s changed list).
    presence_changed: bool,
}

impl RoomState {
    fn has_members(&self) -> bool {
        self.full_len() > 0 || !self.watchers.is_empty() || !self.joining.is_empty()
    }

    /// Removes `conn` from the connections holding the room while joining.
    fn stop_joining(&mut self, conn: ConnId) -> bool {
        !self.joining.is_empty() && self.joining.remove(&conn)
    }

    /// Removes `conn` from the room's notify-mode members.
    fn stop_watching(&mut self, conn: ConnId) -> bool {
        !self.watchers.is_empty() && self.watchers.remove(&conn).is_some()
    }

    /// Publishes the member count to the room's counters after a change.
    fn count_members(&self) {
        let n = self.full_len() + self.watchers.len();
        self.stats.members.store(n, Ordering::Relaxed);
    }

    /// A room's state; with the authoritative log its offsets start after
    /// `floor` ([`RoomIndex::offset_floor`]).
    fn new(mode: LogMode, floor: u64) -> Self {
        let authoritative = mode == LogMode::Authoritative;
        let floor = if authoritative { floor } else { 0 };
        Self {
            plain: Default::default(),
            deflated: None,
            watchers: HashMap::default(),
            joining: HashSet::default(),
            log: VecDeque::new(),
            log_bytes: 0,
            last_offset: floor,
            evicted_upto: floor,
            gone_upto: floor,
            live: authoritative,
            live_from: 0,
            pending: BTreeMap::new(),
            pending_dropped: 0,
            repairing: false,
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            dead: false,
            stats: Arc::default(),
            presence_changed: false,
        }
    }
}

/// A room's state as found by [`RoomIndex::intern`].
pub struct RoomRef(Arc<Room>);

struct Room {
    state: Mutex<RoomState>,
    /// The same counters as `state.stats`, readable without the lock.
    stats: Arc<RoomCounters>,
}

/// The de-duplication key of `key` published by user `sub`: the user's
/// length first, so no two (user, key) pairs give the same text.
pub fn dedup_key(sub: &str, key: &str) -> String {
    format!("{}:{sub}:{key}", sub.len())
}

/// Per-node index from room to its state.
pub struct RoomIndex {
    /// foldhash, seeded per process: SipHash of the name was a tenth of a
    /// join's cost.
    rooms: DashMap<RoomId, Arc<Room>, foldhash::fast::RandomState>,
    count: AtomicUsize,
    limits: RoomLimits,
    mode: LogMode,
    /// Write broadcast frames to members' sockets (run by the node).
    flushers: Flushers<Frame>,
    /// The node tier: big rooms' fan-out split into shards across cores.
    tree: TreeTier,
    /// Rooms whose membership changed since presence last read them, once
    /// each; kept only while [`RoomIndex::track_presence`] is on.
    presence_changed: Mutex<Vec<RoomId>>,
    presence_tracked: AtomicBool,
    /// Encoded bytes of every room's log (`budget`).
    history_bytes: AtomicUsize,
    /// The highest offset of a removed room (authoritative log): rooms made
    /// later start above it.
    offset_floor: AtomicU64,
    /// Held by the shedding (`budget`) under way.
    shedding: Mutex<()>,
    /// When a search for a room slot last found none.
    slot_search_failed: Mutex<Option<Instant>>,
}

impl RoomIndex {
    pub fn new(limits: RoomLimits, mode: LogMode) -> Self {
        let shards = limits.fanout_shards;
        let tree = TreeTier::new(limits.tree);
        Self {
            rooms: DashMap::default(),
            count: AtomicUsize::new(0),
            limits,
            mode,
            flushers: Flushers::new(shards),
            tree,
            presence_changed: Mutex::default(),
            presence_tracked: AtomicBool::new(false),
            history_bytes: AtomicUsize::new(0),
            offset_floor: AtomicU64::new(0),
            shedding: Mutex::new(()),
            slot_search_failed: Mutex::new(None),
        }
    }

    pub fn flushers(&self) -> &Flushers<Frame> {
        &self.flushers
    }

    /// The node tier's counters (split rooms' shard runs).
    pub fn tree_stats(&self) -> &fanout_tree::TreeStats {
        &self.tree.stats
    }

    /// Rooms with state on this node.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Local members of `room` (both modes).
    pub fn members(&self, room: &RoomId) -> usize {
        self.get(room).map_or(0, |r| {
            let st = r.state.lock();
            st.full_len() + st.watchers.len()
        })
    }

    /// The room named `name` if the name is valid, sharing the name of the
    /// room's state when the node has one (a connection's rooms then cost
    /// no allocation of their own; a 2,000-room login made 2,000), and that
    /// state, so that [`RoomIndex::join_found`] need not look it up again.
    pub fn intern(&self, name: &str) -> Option<(RoomId, Option<RoomRef>)> {
        if !RoomId::is_valid(name) {
            return None;
        }
        match self.rooms.get(name) {
            Some(e) => Some((e.key().clone(), Some(RoomRef(e.value().clone())))),
            None => RoomId::parse(name).map(|r| (r, None)),
        }
    }

    fn get(&self, room: &RoomId) -> Option<Arc<Room>> {
        self.rooms.get(room).map(|r| r.clone())
    }

    fn get_or_create(&self, room: &RoomId) -> Result<Arc<Room>, RoomError> {
        if let Some(r) = self.get(room) {
            return Ok(r);
        }
        if self.count.load(Ordering::Relaxed) >= self.limits.max_rooms && !self.free_a_slot() {
            return Err(RoomError::TooManyRooms);
        }
        let entry = self.rooms.entry(room.clone()).or_insert_with(|| {
            self.count.fetch_add(1, Ordering::Relaxed);
            let state = RoomState::new(self.mode, self.offset_floor());
            Arc::new(Room {
                stats: state.stats.clone(),
                state: Mutex::new(state),
            })
        });
        Ok(entry.clone())
    }

    /// Runs `f` on the live state of `room`, creating it if needed.
    fn with_room<R>(&self, room: &RoomId, f: impl FnMut(&mut RoomState) -> R) -> Result<R, RoomError> {
        self.with_room_found(None, room, f)
    }

    /// [`RoomIndex::with_room`], starting from state found earlier.
    fn with_room_found<R>(
        &self,
        found: Option<&RoomRef>,
        room: &RoomId,
        mut f: impl FnMut(&mut RoomState) -> R,
    ) -> Result<R, RoomError> {
        if let Some(RoomRef(r)) = found {
            let mut st = r.state.lock();
            if !st.dead {
                return Ok(f(&mut st));
            }
        }
        loop {
            let r = self.get_or_create(room)?;
            let mut st = r.state.lock();
            if st.dead {
                continue;
            }
            return Ok(f(&mut st));
        }
    }

    /// Runs `f` on the state of `room` if it exists.
    fn with_existing<R>(&self, room: &RoomId, f: impl FnOnce(&mut RoomState) -> R) -> Option<R> {
        let r = self.get(room)?;
        let mut st = r.state.lock();
        if st.dead {
            return None;
        }
        Some(f(&mut st))
    }

    /// Drops the room's state. Called with the lock held.
    fn remove_locked(&self, room: &RoomId, st: &mut RoomState) {
        if self.mode == LogMode::Authoritative {
            self.offset_floor.fetch_max(st.last_offset, Ordering::Relaxed);
        }
        self.account(st.log_bytes, 0);
        st.log_bytes = 0;
        st.log.clear();
        st.dead = true;
        self.rooms.remove(room);
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds `conn` to `room`; `held` is the slot of the full membership the
    /// connection already has there, if any (from an earlier [`Joined`]). If
    /// the room is live, the returned offset is the one the membership took
    /// effect at and, with `since`, the catch-up up to it is read under the
    /// same lock: no gap, no overlap with live pushes.
    pub fn join(
        &self,
        room: &RoomId,
        conn: ConnId,
        member: Member<'_>,
        since: Option<u64>,
        held: Option<MemberSlot>,
    ) -> Result<Joined, RoomError> {
        self.join_found(None, room, conn, member, since, held)
    }

    /// [`RoomIndex::join`] with the state [`RoomIndex::intern`] found (a
    /// room removed since then is looked up again).
    pub fn join_found(
        &self,
        found: Option<&RoomRef>,
        room: &RoomId,
        conn: ConnId,
        member: Member<'_>,
        since: Option<u64>,
        held: Option<MemberSlot>,
    ) -> Result<Joined, RoomError> {
        self.with_room_found(found, room, |st| {
            let first = !st.has_members();
            let transition = if first {
                Transition::FirstLocal
            } else {
                Transition::Unchanged
            };
            // One membership per connection: joining again may switch modes.
            let (since, slot) = match member {
                Member::Joining => {
                    st.joining.insert(conn);
                    return Joined {
                        transition,
                        slot: held,
                        at: None,
                    };
                }
                Member::Full(outbox) | Member::FullProto(outbox) | Member::Deflated { outbox, .. } => {
                    st.stop_joining(conn);
                    st.stop_watching(conn);
                    (since, Some(st.start_full(conn, outbox, member.full_set(), held)))
                }
                Member::Notify(activity) => {
                    st.stop_joining(conn);
                    st.stop_full(conn, held);
                    st.watchers.insert(conn, activity.clone());
                    // Notify mode pushes no messages, so there is no catch-up.
                    (None, None)
                }
            };
            st.count_members();
            self.presence_note(room, st);
            let at = st
                .live
                .then(|| (st.last_offset, since.map(|s| st.catchup(s, st.last_offset))));
            Joined { transition, slot, at }
        })
    }

    /// The offset `room` went live at (cache mode), if it is live.
    pub fn live_from(&self, room: &RoomId) -> Option<u64> {
        self.with_existing(room, |st| st.live.then_some(st.live_from)).flatten()
    }

    /// Whether `room` is live on this node.
    pub fn is_live(&self, room: &RoomId) -> bool {
        self.with_existing(room, |st| st.live).unwrap_or(false)
    }

    /// Removes `conn` from `room` (`held`: its full membership's slot, if
    /// any). With the authoritative log an empty room without history is
    /// dropped at once; a cache is dropped by [`RoomIndex::forget_if_empty`]
    /// after the bus's linger.
    pub fn leave(&self, room: &RoomId, conn: ConnId, held: Option<MemberSlot>) -> Transition {
        let Some(r) = self.get(room) else {
            return Transition::Unchanged;
        };
        let mut st = r.state.lock();
        let was_member = st.stop_full(conn, held);
        let was_watcher = st.stop_watching(conn);
        let was_joining = st.stop_joining(conn);
        st.count_members();
        if st.dead || !(was_member || was_watcher || was_joining) {
            return Transition::Unchanged;
        }
        self.presence_note(room, &mut st);
        if st.has_members() {
            return Transition::Unchanged;
        }
        if self.mode == LogMode::Authoritative && st.log.is_empty() && st.dedup.is_empty() {
            self.remove_locked(room, &mut st);
        }
        Transition::LastLocal
    }

    /// Drops the state of `room` if it has no members (cache mode, after the
    /// linger). Returns whether it did.
    pub fn forget_if_empty(&self, room: &RoomId) -> bool {
        let Some(r) = self.get(room) else {
            return false;
        };
        let mut st = r.state.lock();
        if st.dead || st.has_members() {
            return false;
        }
        self.remove_locked(room, &mut st);
        true
    }

    /// Rooms that are live, with their latest offset (to check for missed
    /// messages after the bus reconnects).
    pub fn live_rooms(&self) -> Vec<(RoomId, u64)> {
        let rooms: Vec<(RoomId, Arc<Room>)> = self
            .rooms
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        rooms
            .into_iter()
            .filter_map(|(id, r)| {
                let st = r.state.lock();
                (st.live && !st.dead).then_some((id, st.last_offset))
            })
            .collect()
    }

    /// The latest offset of `room` (0 if it has none).
    pub fn last_offset(&self, room: &RoomId) -> u64 {
        self.with_existing(room, |st| st.last_offset).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Message;
    use crate::protocol::{Codec, proto};
    use bytes::Bytes;
    use fanout_tree::{Drained, OutboxLimits, Weighted};

    fn limits(history: usize) -> RoomLimits {
        RoomLimits {
            fanout_shards: 1,
            tree: TreeConfig::default(),
            history_size: history,
            history_max_bytes: 1 << 20,
            history_total_bytes: 1 << 30,
            dedup_window: Duration::from_secs(60),
            dedup_max_keys: 100,
            max_rooms: 10,
            max_pending: 4,
        }
    }

    pub(super) fn index(history: usize) -> RoomIndex {
        RoomIndex::new(limits(history), LogMode::Authoritative)
    }

    fn cache(history: usize) -> RoomIndex {
        RoomIndex::new(limits(history), LogMode::Cache)
    }

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    fn outbox() -> ConnOutbox {
        Arc::new(Outbox::new(OutboxLimits::default()))
    }

    fn offset_of(f: &Frame) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(f.as_bytes()).unwrap();
        v["offset"].as_u64().unwrap()
    }

    fn offsets(messages: &[SharedMessage]) -> Vec<u64> {
        messages.iter().map(SharedMessage::offset).collect()
    }

    fn data(d: &'static [u8]) -> Bytes {
        Bytes::from_static(d)
    }

    fn frame(seq: u64) -> SharedMessage {
        SharedMessage::new(Message {
            room: room("r"),
            offset: seq,
            ts: 0,
            from: "a".into(),
            data: data(b"1"),
        })
    }

    fn catchup(j: &Joined) -> (Vec<u64>, bool) {
        match &j.at {
            Some((_, Some(Catchup::Messages { messages, recovered }))) => (offsets(messages), *recovered),
            other => panic!("{other:?}"),
        }
    }

    async fn drained(ob: &ConnOutbox) -> Vec<u64> {
        let mut out = VecDeque::new();
        if ob.queued().0 == 0 {
            return Vec::new();
        }
        assert_eq!(ob.drain(&mut out).await, Drained::Frames);
        out.iter().map(offset_of).collect()
    }

    #[test]
    fn room_names() {
        for ok in ["general", "a", "team-7", "x:y_z", &"r".repeat(128)] {
            assert!(RoomId::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", "chat.>", "*", "a.b", "a b", "é", &"r".repeat(129)] {
            assert!(RoomId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_join_with_state_found_before_the_room_was_dropped_looks_it_up_again() {
        let idx = index(10);
        let first = outbox();
        let joined = idx
            .join(&room("gone"), ConnId(1), Member::Full(&first), None, None)
            .unwrap();
        let (name, found) = idx.intern("gone").unwrap();
        assert!(found.is_some(), "the node has state for the room");
        assert!(idx.intern("a b").is_none(), "an invalid name");
        // The last member leaves: the empty room without a log is dropped,
        // and the state found above is dead.
        assert_eq!(idx.leave(&name, ConnId(1), joined.slot), Transition::LastLocal);
        assert!(idx.is_empty());
        let second = outbox();
        let j = idx
            .join_found(found.as_ref(), &name, ConnId(2), Member::Full(&second), None, None)
            .unwrap();
        assert_eq!(j.transition, Transition::FirstLocal, "a new room state");
        assert_eq!((idx.len(), idx.members(&name)), (1, 1));
    }

    #[test]
    fn transitions_are_reported_once() {
        let idx = index(10);
        let r = room("r");
        let (a, b) = (outbox(), outbox());
        let ja = idx.join(&r, ConnId(1), Member::Full(&a), None, None).unwrap();
        assert_eq!(ja.transition, Transition::FirstLocal);
        let jb = idx.join(&r, ConnId(2), Member::Full(&b), None, None).unwrap();
        assert_eq!(jb.transition, Transition::Unchanged);
        // Joining again with the slot held keeps the one membership.
        let again = idx.join(&r, ConnId(1), Member::Full(&a), None, ja.slot).unwrap();
        assert_eq!(again.slot, ja.slot);
        assert_eq!(idx.members(&r), 2);
        assert_eq!(idx.leave(&r, ConnId(1), ja.slot), Transition::Unchanged);
        assert_eq!(idx.leave(&r, ConnId(1), ja.slot), Transition::Unchanged);
        assert_eq!(idx.leave(&r, ConnId(2), jb.slot), Transition::LastLocal);
        assert!(idx.is_empty(), "an empty room with no log is dropped");
    }

    #[tokio::test]
    async fn since_catchup_is_exact_and_eviction_is_reported() {
        let idx = index(5);
        let r = room("r");
        let now = Instant::now();
        for _ in 0..8 {
            idx.publish(&r, "a", &data(b"1"), None, 0, now).unwrap();
        }
        let ob = outbox();
        let j = idx.join(&r, ConnId(1), Member::Full(&ob), Some(5), None).unwrap();
        assert_eq!(j.at.as_ref().unwrap().0, 8);
        assert_eq!(catchup(&j), (vec![6, 7, 8], true));
        // Offsets 1..=3 were evicted: since 2 cannot be served.
        let j = idx.join(&r, ConnId(2), Member::Full(&ob), Some(2), None).unwrap();
        assert_eq!(catchup(&j), (vec![], false));
        // since 3: 4..=8 are all there.
        let j = idx.join(&r, ConnId(3), Member::Full(&ob), Some(3), None).unwrap();
        assert_eq!(catchup(&j), (vec![4, 5, 6, 7, 8], true));
        // A since from the future (the log was reset) is not recovered.
        let j = idx.join(&r, ConnId(4), Member::Full(&ob), Some(99), None).unwrap();
        assert_eq!(catchup(&j), (vec![], false));
        idx.publish(&r, "a", &data(b"2"), None, 0, now).unwrap();
        assert_eq!(
            drained(&ob).await,
            vec![9, 9, 9, 9],
            "one per membership of this outbox"
        );
    }

    #[test]
    fn dedup_returns_the_same_offset() {
        let idx = index(100);
        let r = room("r");
        let now = Instant::now();
        let a = idx.publish(&r, "a", &data(b"1"), Some("k"), 0, now).unwrap();
        let b = idx.publish(&r, "a", &data(b"1"), Some("k"), 0, now).unwrap();
        assert_eq!(a.offset, b.offset);
        assert!(a.fresh && !b.fresh);
        let later = now + Duration::from_secs(61);
        let c = idx.publish(&r, "a", &data(b"1"), Some("k"), 0, later).unwrap();
        assert!(c.fresh, "the window expired");
        assert_eq!(idx.last_offset(&r), 2);
    }

    #[test]
    fn one_users_key_never_swallows_another_users_message() {
        let idx = index(100);
        let r = room("kr");
        let now = Instant::now();
        let alice = idx
            .publish(&r, "alice", &data(b"1"), Some("c1-000001"), 0, now)
            .unwrap();
        let bob = idx.publish(&r, "bob", &data(b"2"), Some("c1-000001"), 0, now).unwrap();
        assert!(alice.fresh && bob.fresh);
        assert_ne!(alice.offset, bob.offset);
        // Names that would run together without the length prefix.
        assert_ne!(dedup_key("a:b", "c"), dedup_key("a", "b:c"));
        let retry = idx
            .publish(&r, "alice", &data(b"1"), Some("c1-000001"), 0, now)
            .unwrap();
        assert_eq!((retry.offset, retry.fresh), (alice.offset, false));
    }

    fn page(p: HistoryPage) -> (Vec<u64>, bool) {
        match p {
            HistoryPage::Messages { messages, more } => (offsets(&messages), more),
            HistoryPage::NeedsBackend => panic!("needs backend"),
        }
    }

    #[test]
    fn history_pages_backwards() {
        let idx = index(100);
        let r = room("r");
        for _ in 0..7 {
            idx.publish(&r, "a", &data(b"1"), None, 0, Instant::now()).unwrap();
        }
        assert_eq!(page(idx.history(&r, None, 3)), (vec![5, 6, 7], true));
        assert_eq!(page(idx.history(&r, Some(5), 3)), (vec![2, 3, 4], true));
        assert_eq!(page(idx.history(&r, Some(2), 3)), (vec![1], false));
        assert_eq!(page(idx.history(&room("none"), None, 3)), (vec![], false));
    }

    /// Rooms with members are never evicted for a slot (`budget`): over
    /// `max_rooms` of them a new room is refused.
    #[test]
    fn room_count_is_capped() {
        let idx = index(10);
        let ob = outbox();
        for i in 0..10 {
            idx.join(&room(&format!("r{i}")), ConnId(1), Member::Full(&ob), None, None)
                .unwrap();
        }
        assert_eq!(
            idx.publish(&room("r10"), "a", &data(b"1"), None, 0, Instant::now()),
            Err(RoomError::TooManyRooms)
        );
    }

    #[tokio::test]
    async fn a_cache_room_buffers_until_live_then_applies_in_order() {
        let idx = cache(100);
        let r = room("r");
        let ob = outbox();
        let j = idx.join(&r, ConnId(1), Member::Full(&ob), Some(3), None).unwrap();
        assert!(j.at.is_none(), "not live yet");
        assert_eq!(idx.deliver(&r, 12, 10, frame(12)), Delivered::Buffered);
        assert_eq!(idx.deliver(&r, 9, 5, frame(9)), Delivered::Buffered);
        // The stream's last offset for the room was 10 when it went live:
        // 9 is older (dropped), 12 follows 10.
        assert_eq!(idx.go_live(&r, 10), None);
        assert_eq!(idx.live_from(&r), Some(10));
        assert_eq!(drained(&ob).await, vec![12]);
        assert!(matches!(idx.catchup(&r, 3, 10), Catchup::NeedsBackend));
        assert_eq!(idx.deliver(&r, 12, 10, frame(12)), Delivered::Duplicate);
        assert_eq!(idx.deliver(&r, 15, 12, frame(15)), Delivered::Applied { members: 1 });
    }

    #[tokio::test]
    async fn a_gap_is_repaired_before_later_messages() {
        let idx = cache(100);
        let r = room("r");
        let ob = outbox();
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 10);
        assert_eq!(
            idx.deliver(&r, 20, 15, frame(20)),
            Delivered::Gap(Gap { after: 10, upto: 15 })
        );
        assert_eq!(idx.deliver(&r, 22, 20, frame(22)), Delivered::Buffered);
        assert_eq!(drained(&ob).await, Vec::<u64>::new());
        assert_eq!(idx.repaired(&r, vec![(13, frame(13)), (15, frame(15))], 15), None);
        assert_eq!(drained(&ob).await, vec![13, 15, 20, 22]);
        assert_eq!(idx.last_offset(&r), 22);
    }

    #[tokio::test]
    async fn pending_overflow_turns_into_a_repair() {
        let idx = cache(100);
        let r = room("r");
        let ob = outbox();
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 1);
        assert!(matches!(idx.deliver(&r, 3, 2, frame(3)), Delivered::Gap(_)));
        for seq in 4..12 {
            idx.deliver(&r, seq, seq - 1, frame(seq));
        }
        // Only 4 fit in pending; the repair must reach what was dropped.
        let gap = idx.repaired(&r, vec![(2, frame(2))], 2).unwrap();
        assert_eq!(gap, Gap { after: 2, upto: 7 });
        let next = idx.repaired(&r, (3..=7).map(|s| (s, frame(s))).collect(), 7);
        assert_eq!(next, None);
        assert_eq!(drained(&ob).await, (2..12).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_requested_repair_waits_for_one_under_way_then_reaches_the_tail() {
        let idx = cache(100);
        let r = room("r");
        let ob = outbox();
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        assert_eq!(idx.request_repair(&r, 5), None, "not live yet: remembered for later");
        assert_eq!(idx.go_live(&r, 2), Some(Gap { after: 2, upto: 5 }));
        assert_eq!(idx.request_repair(&r, 9), None, "a repair is under way");
        let next = idx.repaired(&r, vec![(4, frame(4)), (5, frame(5))], 5);
        assert_eq!(next, Some(Gap { after: 5, upto: 9 }), "then the later tail");
        assert_eq!(idx.repaired(&r, vec![(9, frame(9))], 9), None);
        assert_eq!(idx.request_repair(&r, 9), None, "already there");
        assert_eq!(drained(&ob).await, vec![4, 5, 9]);
    }

    /// A live cache-mode room "r" with one member (its outbox returned,
    /// kept open) and message 1 applied.
    fn live_with_one_message() -> (RoomIndex, RoomId, ConnOutbox) {
        let idx = cache(100);
        let r = room("r");
        let ob = outbox();
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 0);
        idx.deliver(&r, 1, 0, frame(1));
        (idx, r, ob)
    }

    #[test]
    fn lost_messages_restart_the_cache_after_the_hole() {
        let (idx, r, _ob) = live_with_one_message();
        assert_eq!(idx.lost_messages(&r, 6), 1);
        idx.repaired(&r, vec![(7, frame(7))], 7);
        match idx.catchup(&r, 1, 7) {
            Catchup::Messages { recovered, .. } => assert!(!recovered, "2..=6 are gone"),
            Catchup::NeedsBackend => panic!("the hole is known to be gone"),
        }
        match idx.catchup(&r, 6, 7) {
            Catchup::Messages { messages, recovered } => assert_eq!((offsets(&messages), recovered), (vec![7], true)),
            Catchup::NeedsBackend => panic!(),
        }
    }

    /// A room not live yet (a join waiting on the bus, or its state lingering
    /// after a join that failed) has no cache to answer from: its empty log
    /// once answered history with no messages and `more:false`.
    #[test]
    fn a_room_not_live_answers_nothing_from_its_empty_cache() {
        let idx = cache(100);
        let r = room("r");
        idx.join(&r, ConnId(1), Member::Joining, None, None).unwrap();
        assert!(matches!(idx.history(&r, None, 10), HistoryPage::NeedsBackend));
        assert!(matches!(idx.catchup(&r, 3, 5), Catchup::NeedsBackend));
        idx.go_live(&r, 5);
        assert!(matches!(
            idx.catchup(&r, 5, 5),
            Catchup::Messages { recovered: true, .. }
        ));
    }

    /// A gap the broker gave up reading: members are closed, the cache
    /// restarts after it, and an older `since` goes to the stream (which
    /// may still hold the gap) instead of being told recovered:false.
    #[test]
    fn an_unread_gap_resets_members_but_claims_nothing_gone() {
        let (idx, r, _ob) = live_with_one_message();
        assert_eq!(idx.gap_unread(&r, 6), 1);
        idx.repaired(&r, Vec::new(), 6);
        idx.deliver(&r, 7, 6, frame(7));
        assert!(matches!(idx.catchup(&r, 1, 7), Catchup::NeedsBackend));
        assert_eq!(frames(idx.catchup(&r, 6, 7)), (vec![7], true));
        assert!(matches!(idx.history(&r, None, 5), HistoryPage::NeedsBackend));
    }

    fn frames(c: Catchup) -> (Vec<u64>, bool) {
        match c {
            Catchup::Messages { messages, recovered } => (offsets(&messages), recovered),
            Catchup::NeedsBackend => panic!("needs backend"),
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, SharedMessage)> {
        range.map(|s| (s, frame(s))).collect()
    }

    #[test]
    fn stream_reads_in_front_of_the_cache_make_it_whole() {
        let idx = cache(100);
        let r = room("r");
        let ob = outbox();
        let joined = idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 10);
        idx.deliver(&r, 11, 10, frame(11));
        assert!(matches!(idx.history(&r, None, 5), HistoryPage::NeedsBackend));
        // Read for `since` 3 (stored): every message in (3, 10].
        let read = vec![(4, frame(4)), (7, frame(7)), (10, frame(10))];
        let got = idx.catchup_from_stream(&r, 3, 11, &read, 10).unwrap();
        assert_eq!(offsets(&got), vec![4, 7, 10, 11], "the read, then the cache");
        // The cache now holds (3, 11]: the next joiners read nothing.
        assert_eq!(frames(idx.catchup(&r, 5, 11)), (vec![7, 10, 11], true));
        assert_eq!(frames(idx.catchup(&r, 3, 11)), (vec![4, 7, 10, 11], true));
        assert!(matches!(idx.catchup(&r, 2, 11), Catchup::NeedsBackend));
        assert_eq!(page(idx.history(&r, None, 3)), (vec![7, 10, 11], true));
        assert!(matches!(idx.history(&r, None, 5), HistoryPage::NeedsBackend));
        // A read that stops short of the cache's start is not joined to it.
        assert!(idx.catchup_from_stream(&r, 1, 11, &entries(2..=2), 2).is_none());
        let bytes = [4, 7, 10, 11].map(|s| frame(s).weight()).iter().sum();
        assert_eq!(idx.cache_start(&r, 11), Some((3, bytes)));
        // The cache is dropped only without members.
        assert!(!idx.forget_if_empty(&r));
        idx.leave(&r, ConnId(1), joined.slot);
        assert!(idx.forget_if_empty(&r));
        assert_eq!(idx.deliver(&r, 12, 11, frame(12)), Delivered::NoRoom);
    }

    #[test]
    fn stream_reads_fill_the_cache_only_within_its_message_and_byte_caps() {
        let r = room("r");
        let ob = outbox();
        // Message cap: 5.
        let idx = cache(5);
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 20);
        idx.deliver(&r, 21, 20, frame(21));
        idx.deliver(&r, 22, 21, frame(22));
        idx.prepend(&r, 9, &entries(10..=20), 20);
        assert_eq!(idx.cache_start(&r, 22).map(|c| c.0), Some(17), "holds 18..=22");
        assert_eq!(frames(idx.catchup(&r, 17, 22)), (vec![18, 19, 20, 21, 22], true));
        assert!(matches!(idx.catchup(&r, 16, 22), Catchup::NeedsBackend));
        // Byte cap: three frames.
        let mut l = limits(1000);
        l.history_max_bytes = 3 * frame(10).weight();
        let idx = RoomIndex::new(l, LogMode::Cache);
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 20);
        idx.deliver(&r, 21, 20, frame(21));
        let got = idx.catchup_from_stream(&r, 9, 21, &entries(10..=20), 20).unwrap();
        assert_eq!(
            offsets(&got),
            (10..=21).collect::<Vec<_>>(),
            "the joiner gets all of it"
        );
        assert_eq!(
            idx.cache_start(&r, 21).map(|c| c.0),
            Some(18),
            "the cache keeps 19..=21"
        );
        // Full: nothing more is added, and nothing is read again for what it holds.
        idx.prepend(&r, 9, &entries(10..=18), 18);
        assert_eq!(idx.cache_start(&r, 21).map(|c| c.0), Some(18));
        assert_eq!(frames(idx.catchup(&r, 18, 21)), (vec![19, 20, 21], true));
    }

    /// Issue 18 item 6 at the cache's level: a cache that went live at 1030
    /// and then trimmed never claims that offsets before its start were
    /// replayed; only the stream can say (or a known loss).
    #[test]
    fn a_cache_never_claims_offsets_it_does_not_hold() {
        let r = room("r");
        let ob = outbox();
        let mut l = limits(1000);
        l.history_max_bytes = 250 * frame(1000).weight();
        let idx = RoomIndex::new(l, LogMode::Cache);
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 1030);
        assert!(matches!(idx.catchup(&r, 1, 1030), Catchup::NeedsBackend));
        // The stream's messages after 731 fill the cache up to its byte cap.
        idx.prepend(&r, 731, &entries(732..=1030), 1030);
        idx.deliver(&r, 1031, 1030, frame(1031));
        let (start, _) = idx.cache_start(&r, 1031).unwrap();
        assert!(start > 731, "trimmed to the byte cap: starts at {start}");
        for since in [0, 1, 30, 31, start - 1] {
            assert!(
                matches!(idx.catchup(&r, since, 1031), Catchup::NeedsBackend),
                "since {since}: only the stream knows"
            );
        }
        assert_eq!(frames(idx.catchup(&r, 1030, 1031)), (vec![1031], true));
        // A known loss: the node missed messages up to 1040 the stream dropped.
        idx.lost_messages(&r, 1040);
        idx.repaired(&r, vec![(1041, frame(1041))], 1041);
        for since in [0, 1, 1031, 1039] {
            assert_eq!(frames(idx.catchup(&r, since, 1041)), (vec![], false), "since {since}");
        }
        assert_eq!(frames(idx.catchup(&r, 1040, 1041)), (vec![1041], true));
        // Nothing read from the stream covers what is known to be gone.
        idx.prepend(&r, 1000, &entries(1001..=1040), 1040);
        assert_eq!(idx.cache_start(&r, 1041).map(|c| c.0), Some(1040));
    }

    #[test]
    fn a_cache_live_from_an_empty_room_holds_everything() {
        let idx = cache(100);
        let r = room("r");
        let ob = outbox();
        idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        idx.go_live(&r, 0);
        idx.deliver(&r, 3, 0, frame(3));
        assert_eq!(frames(idx.catchup(&r, 0, 3)), (vec![3], true));
        assert_eq!(page(idx.history(&r, None, 5)), (vec![3], false));
    }

    /// Issue 11: a room message is encoded to protobuf once per node: the
    /// frame every protobuf member receives is the one catch-up and history
    /// reuse, and a room without protobuf members never encodes one.
    #[tokio::test]
    async fn a_message_is_encoded_to_protobuf_once_for_members_catchup_and_history() {
        use crate::protocol::{ReplyBody, ServerMsg};
        use ::proto::Message as _;
        use ::proto::client::{ServerFrame, server_frame::Body};

        let idx = index(100);
        let r = room("r");
        let json_member = outbox();
        idx.join(&r, ConnId(100), Member::Full(&json_member), None, None)
            .unwrap();
        let before = proto::tests::message_encodes();
        idx.publish(&r, "bob", &data(b"0"), None, 1, Instant::now()).unwrap();
        assert_eq!(
            proto::tests::message_encodes(),
            before,
            "no protobuf member: no protobuf frame"
        );

        let members: Vec<ConnOutbox> = (0..5).map(|_| outbox()).collect();
        for (i, ob) in members.iter().enumerate() {
            idx.join(&r, ConnId(i as u64), Member::FullProto(ob), None, None)
                .unwrap();
        }
        idx.publish(&r, "alice", &data(br#"{"t":1}"#), None, 7, Instant::now())
            .unwrap();
        assert_eq!(
            proto::tests::message_encodes(),
            before + 1,
            "once for every protobuf member"
        );
        let mut shared = std::collections::HashSet::new();
        for ob in &members {
            let mut out = VecDeque::new();
            assert_eq!(ob.drain(&mut out).await, Drained::Frames);
            assert_eq!(out.len(), 1);
            shared.insert(out[0].wire().as_ptr());
        }
        assert_eq!(shared.len(), 1, "every protobuf member holds the same bytes");
        let shared = *shared.iter().next().unwrap();

        // A protobuf joiner's catch-up pushes that same frame.
        let joiner = outbox();
        let j = idx
            .join(&r, ConnId(50), Member::FullProto(&joiner), Some(1), None)
            .unwrap();
        let Some((
            2,
            Some(Catchup::Messages {
                messages,
                recovered: true,
            }),
        )) = j.at
        else {
            panic!("{:?}", j.at);
        };
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].frame(Codec::Proto).wire().as_ptr(), shared);

        // A history page for a protobuf client reuses each message's encoding.
        let HistoryPage::Messages { messages: page, more } = idx.history(&r, None, 10) else {
            panic!("needs backend");
        };
        let reply = Codec::Proto.encode(&ServerMsg::Reply {
            id: 9,
            ok: ReplyBody::History { messages: &page, more },
        });
        let after_alice = proto::tests::message_encodes();
        assert_eq!(after_alice, before + 2, "the older message once, for the page");
        let frame = ServerFrame::decode(reply.as_bytes()).unwrap();
        let Some(Body::HistoryOk(h)) = frame.body else {
            panic!("{frame:?}");
        };
        let got: Vec<(u64, &str, &[u8])> = h
            .messages
            .iter()
            .map(|m| (m.offset, m.from.as_str(), &m.data[..]))
            .collect();
        assert_eq!(got, vec![(1, "bob", &b"0"[..]), (2, "alice", &br#"{"t":1}"#[..])]);
        // Again: nothing is encoded anew.
        Codec::Proto.encode(&ServerMsg::Reply {
            id: 10,
            ok: ReplyBody::History { messages: &page, more },
        });
        idx.join(&r, ConnId(51), Member::FullProto(&joiner), Some(0), None)
            .unwrap();
        assert_eq!(proto::tests::message_encodes(), after_alice);
    }

    /// Issue 11: the broker sees the rooms only as `dyn Rooms`. Driven
    /// through that interface, out-of-order arrivals, a gap, a repair that
    /// fails and is asked for again, and a loss reach the member in offset
    /// order, and the queries see the same state.
    #[tokio::test]
    async fn the_broker_drives_a_cache_room_through_its_interface() {
        use crate::broker::Rooms;

        let idx = Arc::new(cache(100));
        let rooms: Arc<dyn Rooms> = idx.clone();
        let r = room("r");
        let ob = outbox();
        let joined = idx.join(&r, ConnId(1), Member::Full(&ob), None, None).unwrap();
        // Out of order, before the room is live: kept.
        assert_eq!(rooms.deliver(&r, 13, 12, frame(13)), Delivered::Buffered);
        assert_eq!(rooms.deliver(&r, 11, 10, frame(11)), Delivered::Buffered);
        assert!(!rooms.is_live(&r));
        assert_eq!(rooms.cache_start(&r, 13), None);
        // Live at 10: 11 follows; 13 waits behind 12, the gap to read.
        assert_eq!(rooms.go_live(&r, 10), Some(Gap { after: 11, upto: 12 }));
        assert_eq!(rooms.last_offset(&r), 11);
        // A tail learnt meanwhile goes to the holder of the gap.
        assert_eq!(rooms.request_repair(&r, 20), None);
        assert_eq!(
            rooms.repaired(&r, entries(12..=12), 12),
            Some(Gap { after: 13, upto: 20 })
        );
        assert_eq!(drained(&ob).await, vec![11, 12, 13]);
        // The holder fails; the next request gets the gap again.
        rooms.repair_failed(&r);
        assert_eq!(rooms.deliver(&r, 13, 12, frame(13)), Delivered::Duplicate);
        assert_eq!(rooms.request_repair(&r, 20), Some(Gap { after: 13, upto: 20 }));
        // The stream dropped up to 17 before this node read it.
        assert_eq!(rooms.lost_messages(&r, 17), 1, "the member must resume");
        assert_eq!(rooms.repaired(&r, entries(18..=20), 20), None);
        assert_eq!(rooms.live_rooms(), vec![(r.clone(), 20)]);
        assert_eq!(frames(rooms.catchup(&r, 17, 20)), (vec![18, 19, 20], true));
        assert_eq!(frames(rooms.catchup(&r, 12, 20)), (vec![], false));
        assert_eq!(rooms.cache_start(&r, 20).map(|c| c.0), Some(17));
        // Ephemeral messages reach members without being kept.
        let ob2 = outbox();
        let second = idx.join(&r, ConnId(2), Member::Full(&ob2), None, None).unwrap();
        assert_eq!(rooms.broadcast_unstored(&r, &frame(0)), 1);
        assert_eq!(drained(&ob2).await, vec![0]);
        assert_eq!(rooms.last_offset(&r), 20);
        // The linger ends: state is dropped only without members.
        assert!(!rooms.forget_if_empty(&r));
        idx.leave(&r, ConnId(1), joined.slot);
        idx.leave(&r, ConnId(2), second.slot);
        assert!(rooms.forget_if_empty(&r));
        assert!(!rooms.is_live(&r));
        assert_eq!(rooms.deliver(&r, 21, 20, frame(21)), Delivered::NoRoom);
    }
}
