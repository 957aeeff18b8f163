//! Per-node room state: local members, the recent-message log, offsets and
//! publish de-duplication.
//!
//! Owns local membership and the per-room log that serves `since` recovery and
//! `history`. Does not own sockets (`conn` drains outboxes) or cross-node
//! routing (`bus`).
//!
//! Invariants:
//! - A conn is in a room at most once; the first and last local member of a
//!   room are each reported exactly once ([`Transition`]).
//! - Within a room, frames reach every member in offset order: a message is
//!   appended to the log and offered to members under the room's lock, and a
//!   joiner's catch-up is read under that same lock, so catch-up and live
//!   messages neither overlap nor leave a gap.
//! - A message push is encoded once; every member and the log share its bytes.
//!
//! Concurrency: a `DashMap` from name to `Arc<Room>`; the map's shard guard is
//! released before the room's own mutex is taken, and no lock is held across
//! `.await`. Broadcasts never block: full outboxes overflow and their writers
//! close those connections as slow consumers.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use fanout_tree::{MemberSet, Outbox, Weighted};
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::protocol;

/// A validated room name: 1 to 128 characters from `A-Z a-z 0-9 _ - :`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

impl RoomId {
    /// Longest room name, in characters.
    pub const MAX_LEN: usize = 128;

    /// Validates `name`. Wildcards and subject separators never pass, so a
    /// room name is always safe to put in a bus subject.
    pub fn parse(name: &str) -> Option<Self> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':');
        ok.then(|| Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection's id, unique within the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One encoded server frame, shared by reference count between the log and
/// every outbox it is queued in.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Frame {
    pub fn text(s: String) -> Self {
        Self::Text(Utf8Bytes::from(s))
    }

    pub fn into_message(self) -> Message {
        match self {
            Self::Text(t) => Message::Text(t),
            Self::Binary(b) => Message::Binary(b),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text(t) => t.as_bytes(),
            Self::Binary(b) => b,
        }
    }
}

impl Weighted for Frame {
    fn weight(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Binary(b) => b.len(),
        }
    }
}

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
    /// Bytes of encoded frames kept per room.
    pub history_max_bytes: usize,
    /// How long a publish `key` is remembered.
    pub dedup_window: Duration,
    /// Most keys remembered per room.
    pub dedup_max_keys: usize,
    /// Most rooms with state on the node.
    pub max_rooms: usize,
}

/// What a join did.
#[derive(Debug)]
pub struct Joined {
    /// The room's latest offset when the membership took effect.
    pub offset: u64,
    /// For a join with `since`: whether every message after it was supplied.
    pub recovered: Option<bool>,
    pub transition: Transition,
}

/// Why a room operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("the node holds too many rooms")]
    TooManyRooms,
}

/// A stored message: its offset and the encoded push.
#[derive(Debug, Clone)]
struct Entry {
    offset: u64,
    frame: Frame,
}

#[derive(Default)]
struct RoomState {
    members: MemberSet<ConnId, Frame>,
    log: VecDeque<Entry>,
    log_bytes: usize,
    last_offset: u64,
    /// Every offset up to and including this one may be missing from `log`.
    evicted_upto: u64,
    dedup: HashMap<Box<str>, u64>,
    dedup_order: VecDeque<(Instant, Box<str>)>,
    /// Removed from the index; a caller holding an old `Arc` must look again.
    dead: bool,
}

struct Room {
    state: Mutex<RoomState>,
}

/// The outcome of a local publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    /// False when the `key` was seen before: nothing was stored or sent.
    pub fresh: bool,
    /// Members the message was queued for.
    pub delivered: usize,
    /// Members closed as slow consumers by this message.
    pub slow: usize,
}

/// Per-node index from room to its state.
pub struct RoomIndex {
    rooms: DashMap<RoomId, Arc<Room>>,
    count: AtomicUsize,
    limits: RoomLimits,
}

impl RoomIndex {
    pub fn new(limits: RoomLimits) -> Self {
        Self {
            rooms: DashMap::new(),
            count: AtomicUsize::new(0),
            limits,
        }
    }

    /// Rooms with state on this node.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Local members of `room`.
    pub fn members(&self, room: &RoomId) -> usize {
        self.rooms.get(room).map_or(0, |r| r.state.lock().members.len())
    }

    fn get_or_create(&self, room: &RoomId) -> Result<Arc<Room>, RoomError> {
        if let Some(r) = self.rooms.get(room) {
            return Ok(r.clone());
        }
        if self.count.load(Ordering::Relaxed) >= self.limits.max_rooms {
            return Err(RoomError::TooManyRooms);
        }
        let entry = self.rooms.entry(room.clone()).or_insert_with(|| {
            self.count.fetch_add(1, Ordering::Relaxed);
            Arc::new(Room {
                state: Mutex::new(RoomState::default()),
            })
        });
        Ok(entry.clone())
    }

    /// Runs `f` on the live state of `room`, creating it if needed.
    fn with_room<R>(&self, room: &RoomId, mut f: impl FnMut(&mut RoomState) -> R) -> Result<R, RoomError> {
        loop {
            let r = self.get_or_create(room)?;
            let mut st = r.state.lock();
            if st.dead {
                continue;
            }
            return Ok(f(&mut st));
        }
    }

    /// Drops the room's state if it holds nothing. Called with the lock held.
    fn reap_if_empty(&self, room: &RoomId, st: &mut RoomState) {
        if st.members.is_empty() && st.log.is_empty() && st.dedup.is_empty() && !st.dead {
            st.dead = true;
            self.rooms.remove(room);
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Adds `conn` to `room`. With `since`, the messages after it are appended
    /// to `catchup` (oldest first) if they are all still in the log and fit in
    /// `catchup_budget` bytes (which is reduced by what was taken).
    pub fn join(
        &self,
        room: &RoomId,
        conn: ConnId,
        outbox: &ConnOutbox,
        since: Option<u64>,
        catchup: &mut Vec<Frame>,
        catchup_budget: &mut usize,
    ) -> Result<Joined, RoomError> {
        self.with_room(room, |st| {
            let first = st.members.is_empty();
            st.members.insert(conn, outbox.clone());
            let recovered = since.map(|since| {
                if since >= st.last_offset {
                    // Nothing missed, unless the client saw offsets this log
                    // never issued (e.g. the node restarted): it must reload.
                    return since == st.last_offset;
                }
                if since < st.evicted_upto {
                    return false;
                }
                let start = st.log.partition_point(|e| e.offset <= since);
                let bytes: usize = st.log.range(start..).map(|e| e.frame.weight()).sum();
                if bytes > *catchup_budget {
                    return false;
                }
                *catchup_budget -= bytes;
                catchup.extend(st.log.range(start..).map(|e| e.frame.clone()));
                true
            });
            Joined {
                offset: st.last_offset,
                recovered,
                transition: if first {
                    Transition::FirstLocal
                } else {
                    Transition::Unchanged
                },
            }
        })
    }

    /// Removes `conn` from `room`.
    pub fn leave(&self, room: &RoomId, conn: ConnId) -> Transition {
        let Some(r) = self.rooms.get(room).map(|r| r.clone()) else {
            return Transition::Unchanged;
        };
        let mut st = r.state.lock();
        if st.dead || !st.members.remove(conn) {
            return Transition::Unchanged;
        }
        if st.members.is_empty() {
            self.reap_if_empty(room, &mut st);
            Transition::LastLocal
        } else {
            Transition::Unchanged
        }
    }

    /// Stores a message published on this node (the embedded bus): assigns
    /// the next offset, remembers `key`, encodes the push once, appends it to
    /// the log and offers it to every member.
    pub fn publish(
        &self,
        room: &RoomId,
        from_json: &str,
        data: &[u8],
        key: Option<&str>,
        ts_ms: u64,
        now: Instant,
    ) -> Result<Published, RoomError> {
        self.with_room(room, |st| {
            self.expire_keys(st, now);
            if let Some(offset) = key.and_then(|k| st.dedup.get(k)) {
                return Published {
                    offset: *offset,
                    fresh: false,
                    delivered: 0,
                    slow: 0,
                };
            }
            let offset = st.last_offset + 1;
            let frame = Frame::text(protocol::message_push(room, offset, ts_ms, from_json, data));
            if let Some(k) = key {
                let k: Box<str> = k.into();
                st.dedup.insert(k.clone(), offset);
                st.dedup_order.push_back((now, k));
                if st.dedup_order.len() > self.limits.dedup_max_keys
                    && let Some((_, old)) = st.dedup_order.pop_front()
                {
                    st.dedup.remove(&old);
                }
            }
            let (delivered, slow) = self.append_and_broadcast(st, offset, frame);
            Published {
                offset,
                fresh: true,
                delivered,
                slow,
            }
        })
    }

    fn expire_keys(&self, st: &mut RoomState, now: Instant) {
        while let Some((at, _)) = st.dedup_order.front() {
            if now.duration_since(*at) < self.limits.dedup_window {
                break;
            }
            if let Some((_, k)) = st.dedup_order.pop_front() {
                st.dedup.remove(&k);
            }
        }
    }

    fn append_and_broadcast(&self, st: &mut RoomState, offset: u64, frame: Frame) -> (usize, usize) {
        st.last_offset = offset;
        st.log_bytes += frame.weight();
        st.log.push_back(Entry {
            offset,
            frame: frame.clone(),
        });
        while st.log.len() > self.limits.history_size
            || (st.log_bytes > self.limits.history_max_bytes && st.log.len() > 1)
        {
            if let Some(old) = st.log.pop_front() {
                st.log_bytes -= old.frame.weight();
                st.evicted_upto = old.offset;
            }
        }
        let mut slow = Vec::new();
        let delivered = st.members.broadcast(&frame, &mut slow);
        (delivered, slow.len())
    }

    /// Up to `limit` messages older than `before` (all if `None`), oldest
    /// first, and whether older ones remain in the log.
    pub fn history(&self, room: &RoomId, before: Option<u64>, limit: usize) -> (Vec<Frame>, bool) {
        let Some(r) = self.rooms.get(room).map(|r| r.clone()) else {
            return (Vec::new(), false);
        };
        let st = r.state.lock();
        let end = match before {
            Some(b) => st.log.partition_point(|e| e.offset < b),
            None => st.log.len(),
        };
        let start = end.saturating_sub(limit);
        let frames = st.log.range(start..end).map(|e| e.frame.clone()).collect();
        (frames, start > 0)
    }

    /// The latest offset of `room` (0 if it has none).
    pub fn last_offset(&self, room: &RoomId) -> u64 {
        self.rooms.get(room).map_or(0, |r| r.state.lock().last_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_tree::{Drained, OutboxLimits};

    fn index(history: usize) -> RoomIndex {
        RoomIndex::new(RoomLimits {
            history_size: history,
            history_max_bytes: 1 << 20,
            dedup_window: Duration::from_secs(60),
            dedup_max_keys: 100,
            max_rooms: 10,
        })
    }

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    fn outbox() -> ConnOutbox {
        Arc::new(Outbox::new(OutboxLimits::default()))
    }

    fn offsets(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_slice(f.as_bytes()).unwrap();
                v["offset"].as_u64().unwrap()
            })
            .collect()
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
    fn transitions_are_reported_once() {
        let idx = index(10);
        let r = room("r");
        let (a, b) = (outbox(), outbox());
        let mut c = Vec::new();
        let mut budget = usize::MAX;
        assert_eq!(
            idx.join(&r, ConnId(1), &a, None, &mut c, &mut budget)
                .unwrap()
                .transition,
            Transition::FirstLocal
        );
        assert_eq!(
            idx.join(&r, ConnId(2), &b, None, &mut c, &mut budget)
                .unwrap()
                .transition,
            Transition::Unchanged
        );
        assert_eq!(idx.leave(&r, ConnId(1)), Transition::Unchanged);
        assert_eq!(idx.leave(&r, ConnId(1)), Transition::Unchanged);
        assert_eq!(idx.leave(&r, ConnId(2)), Transition::LastLocal);
        assert!(idx.is_empty(), "an empty room with no log is dropped");
    }

    #[tokio::test]
    async fn since_catchup_is_exact_and_eviction_is_reported() {
        let idx = index(5);
        let r = room("r");
        let now = Instant::now();
        for _ in 0..8 {
            idx.publish(&r, "\"a\"", b"1", None, 0, now).unwrap();
        }
        let ob = outbox();
        let mut c = Vec::new();
        let mut budget = usize::MAX;
        let j = idx.join(&r, ConnId(1), &ob, Some(5), &mut c, &mut budget).unwrap();
        assert_eq!((j.offset, j.recovered), (8, Some(true)));
        assert_eq!(offsets(&c), vec![6, 7, 8]);
        c.clear();
        // Offsets 1..=3 were evicted: since 2 cannot be served.
        let j = idx.join(&r, ConnId(2), &ob, Some(2), &mut c, &mut budget).unwrap();
        assert_eq!(j.recovered, Some(false));
        assert!(c.is_empty());
        // since 3: 4..=8 are all there.
        let j = idx.join(&r, ConnId(3), &ob, Some(3), &mut c, &mut budget).unwrap();
        assert_eq!(j.recovered, Some(true));
        assert_eq!(offsets(&c), vec![4, 5, 6, 7, 8]);
        // A since from the future (the log was reset) is not recovered.
        let j = idx.join(&r, ConnId(4), &ob, Some(99), &mut c, &mut budget).unwrap();
        assert_eq!(j.recovered, Some(false));
        // Live messages go to members.
        idx.publish(&r, "\"a\"", b"2", None, 0, now).unwrap();
        let mut out = VecDeque::new();
        assert_eq!(ob.drain(&mut out).await, Drained::Frames);
        assert_eq!(out.len(), 4, "one per membership of this outbox");
    }

    #[test]
    fn catchup_over_budget_is_not_recovered() {
        let idx = index(100);
        let r = room("r");
        for _ in 0..10 {
            idx.publish(&r, "\"a\"", b"1", None, 0, Instant::now()).unwrap();
        }
        let mut c = Vec::new();
        let mut budget = 100;
        let j = idx
            .join(&r, ConnId(1), &outbox(), Some(0), &mut c, &mut budget)
            .unwrap();
        assert_eq!(j.recovered, Some(false));
        assert!(c.is_empty());
        assert_eq!(budget, 100);
    }

    #[test]
    fn dedup_returns_the_same_offset() {
        let idx = index(100);
        let r = room("r");
        let now = Instant::now();
        let a = idx.publish(&r, "\"a\"", b"1", Some("k"), 0, now).unwrap();
        let b = idx.publish(&r, "\"a\"", b"1", Some("k"), 0, now).unwrap();
        assert_eq!(a.offset, b.offset);
        assert!(a.fresh && !b.fresh);
        let later = now + Duration::from_secs(61);
        let c = idx.publish(&r, "\"a\"", b"1", Some("k"), 0, later).unwrap();
        assert!(c.fresh, "the window expired");
        assert_eq!(idx.last_offset(&r), 2);
    }

    #[test]
    fn history_pages_backwards() {
        let idx = index(100);
        let r = room("r");
        for _ in 0..7 {
            idx.publish(&r, "\"a\"", b"1", None, 0, Instant::now()).unwrap();
        }
        let (page, more) = idx.history(&r, None, 3);
        assert_eq!((offsets(&page), more), (vec![5, 6, 7], true));
        let (page, more) = idx.history(&r, Some(5), 3);
        assert_eq!((offsets(&page), more), (vec![2, 3, 4], true));
        let (page, more) = idx.history(&r, Some(2), 3);
        assert_eq!((offsets(&page), more), (vec![1], false));
        assert_eq!(idx.history(&room("none"), None, 3).0.len(), 0);
    }

    #[test]
    fn room_count_is_capped() {
        let idx = index(10);
        for i in 0..10 {
            idx.publish(&room(&format!("r{i}")), "\"a\"", b"1", None, 0, Instant::now())
                .unwrap();
        }
        assert_eq!(
            idx.publish(&room("r10"), "\"a\"", b"1", None, 0, Instant::now()),
            Err(RoomError::TooManyRooms)
        );
    }
}
