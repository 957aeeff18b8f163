//! How a room's members follow it, and the broadcast that offers a message
//! to all of them.
//!
//! Owns the member kinds ([`Member`]), the pending `activity` counts of
//! notify-mode members ([`Activity`]) and the broadcast step of a room's
//! state. Does not own the log (`log`) nor ordering (`sequencer`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use fanout_tree::{MemberSet, Outbox, Weighted};
use parking_lot::Mutex;

use super::{ConnId, ConnOutbox, Entry, Frame, RoomIndex, RoomState, SharedMessage};
use crate::model::RoomId;
use crate::protocol::Codec;

/// How a connection follows a room.
#[derive(Clone, Copy)]
pub enum Member<'a> {
    /// Every message is pushed (`mode: full`).
    Full(&'a ConnOutbox),
    /// The same on `gw.v1.proto`.
    FullProto(&'a ConnOutbox),
    /// Every message, compressed (`permessage-deflate` with the full
    /// window): the frame compressed once per node for every such member
    /// of `codec`.
    Deflated { outbox: &'a ConnOutbox, codec: Codec },
    /// Only coalesced `activity` pushes (`mode: notify`, background rooms).
    Notify(&'a Arc<Activity>),
    /// Holds the room (its state, its bus subscription) while the connection
    /// waits on the broker before it really joins; receives nothing. Joining
    /// again in another mode replaces it, under the same lock that reads the
    /// joiner's offset and catch-up.
    Joining,
}

/// Room -> (latest offset, messages counted).
type PendingCounts = HashMap<RoomId, (u64, u64)>;

/// A connection's pending `activity` counts for its notify-mode rooms. A
/// message costs a notify member one map update; the connection's writer
/// turns the counts into at most one `activity` push per room per interval.
#[derive(Default)]
pub struct Activity {
    /// Room -> (latest offset, count), and when the first count arrived.
    pending: Mutex<(PendingCounts, Option<tokio::time::Instant>)>,
    ready: tokio::sync::Notify,
}

impl Activity {
    /// Counts one message of `room` at `offset`.
    pub fn bump(&self, room: &RoomId, offset: u64) {
        let mut guard = self.pending.lock();
        let (p, first_at) = &mut *guard;
        let was_empty = p.is_empty();
        if was_empty {
            *first_at = Some(tokio::time::Instant::now());
        }
        match p.get_mut(room) {
            Some(e) => {
                e.0 = offset.max(e.0);
                e.1 += 1;
            }
            None => {
                p.insert(room.clone(), (offset, 1));
            }
        }
        drop(guard);
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// Waits until some count is pending; returns when the first one arrived.
    pub async fn pending(&self) -> tokio::time::Instant {
        loop {
            if let Some(at) = self.pending.lock().1 {
                return at;
            }
            self.ready.notified().await;
        }
    }

    /// Takes every pending count: (room, latest offset, messages since the last take).
    pub fn take(&self) -> Vec<(RoomId, u64, u64)> {
        let mut guard = self.pending.lock();
        let (p, first_at) = &mut *guard;
        *first_at = None;
        let out = p.drain().map(|(room, (offset, count))| (room, offset, count)).collect();
        if p.capacity() > 64 {
            *p = HashMap::new();
        }
        out
    }

    /// Forgets the pending count of `room` (the connection left it).
    pub fn forget(&self, room: &RoomId) {
        let mut guard = self.pending.lock();
        guard.0.remove(room);
        if guard.0.is_empty() {
            guard.1 = None;
        }
    }
}

/// The slot of a codec's compressed members in `RoomState::deflated`.
fn deflated_slot(codec: Codec) -> usize {
    match codec {
        Codec::Json => 0,
        Codec::Proto => 1,
    }
}

impl RoomState {
    /// Members that get every message, of every kind.
    pub(super) fn full_len(&self) -> usize {
        let deflated = self.deflated.as_ref().map_or(0, |d| d[0].len() + d[1].len());
        self.members.len() + self.proto_members.len() + deflated
    }

    /// Adds a member that negotiated compression.
    pub(super) fn insert_deflated(&mut self, conn: ConnId, outbox: &ConnOutbox, codec: Codec) {
        self.deflated.get_or_insert_default()[deflated_slot(codec)].insert(conn, outbox.clone());
    }

    /// Removes `conn` from the members that get every message; true if it
    /// was one. The compressed members' sets go once the last one left.
    pub(super) fn remove_full(&mut self, conn: ConnId) -> bool {
        let mut was = self.members.remove(conn) | self.proto_members.remove(conn);
        if let Some(d) = &mut self.deflated {
            was |= d[0].remove(conn) | d[1].remove(conn);
            if d.iter().all(MemberSet::is_empty) {
                self.deflated = None;
            }
        }
        was
    }

    /// Closes every member that gets every message as a slow consumer;
    /// returns how many.
    pub(super) fn abort_full(&self) -> usize {
        let deflated = self
            .deflated
            .as_ref()
            .map_or(0, |d| d[0].abort_all() + d[1].abort_all());
        self.members.abort_all() + self.proto_members.abort_all() + deflated
    }
}

impl RoomIndex {
    pub(super) fn append_and_broadcast(
        &self,
        room: &RoomId,
        st: &mut RoomState,
        offset: u64,
        msg: SharedMessage,
    ) -> usize {
        st.last_offset = offset;
        st.log_bytes += msg.weight();
        st.log.push_back(Entry {
            offset,
            msg: msg.clone(),
        });
        self.trim(st);
        let mut slow = Vec::new();
        let delivered = self.broadcast(st, &msg, &mut slow);
        for w in st.watchers.values() {
            w.bump(room, offset);
        }
        let delivered = delivered + st.watchers.len();
        st.stats.record(delivered);
        delivered
    }

    /// Offers `msg` to the room's members, each codec's frame shared by all
    /// of its members (the protobuf one made on the first broadcast that has
    /// protobuf members, a compressed one on the first that has compressed
    /// members of that codec), and hands the outboxes that need writing to
    /// the flushers.
    pub(super) fn broadcast(&self, st: &RoomState, msg: &SharedMessage, slow: &mut Vec<ConnId>) -> usize {
        // One list per thread, reused: no allocation per message.
        thread_local! {
            static SCHEDULE: RefCell<Vec<Arc<Outbox<Frame>>>> = const { RefCell::new(Vec::new()) };
        }
        SCHEDULE.with_borrow_mut(|schedule| {
            let mut delivered = 0;
            if !st.members.is_empty() {
                delivered += st.members.broadcast(msg.frame(Codec::Json), slow, schedule);
            }
            if !st.proto_members.is_empty() {
                delivered += st.proto_members.broadcast(msg.frame(Codec::Proto), slow, schedule);
            }
            if let Some(d) = &st.deflated {
                for codec in [Codec::Json, Codec::Proto] {
                    let set = &d[deflated_slot(codec)];
                    if !set.is_empty() {
                        delivered += set.broadcast(msg.deflated_frame(codec), slow, schedule);
                    }
                }
            }
            self.flushers.schedule(schedule);
            if schedule.capacity() > 1 << 16 {
                *schedule = Vec::new();
            }
            delivered
        })
    }

    /// Broadcasts a message that is not stored (ephemeral rooms).
    pub fn broadcast_unstored(&self, room: &RoomId, msg: &SharedMessage) -> usize {
        self.with_existing(room, |st| {
            let mut slow = Vec::new();
            for w in st.watchers.values() {
                w.bump(room, 0);
            }
            let delivered = self.broadcast(st, msg, &mut slow) + st.watchers.len();
            st.stats.record(delivered);
            delivered
        })
        .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use fanout_tree::{Drained, OutboxLimits};

    use super::*;
    use crate::model::ConnId;
    use crate::rooms::{Catchup, LogMode, RoomLimits};
    use crate::transport::deflate;

    fn outbox() -> ConnOutbox {
        Arc::new(Outbox::new(OutboxLimits::default()))
    }

    async fn one_frame(ob: &ConnOutbox) -> Frame {
        let mut out = VecDeque::new();
        assert_eq!(ob.drain(&mut out).await, Drained::Frames);
        assert_eq!(out.len(), 1);
        out.pop_front().unwrap()
    }

    /// Issue 17: a room message is compressed once per node and codec,
    /// however many members negotiated `permessage-deflate`; they, and a
    /// joiner's catch-up, share the compressed bytes; members without
    /// compression get the plain frame.
    #[tokio::test]
    async fn a_message_is_deflated_once_for_every_compressed_member_and_catchup() {
        let idx = RoomIndex::new(
            RoomLimits {
                fanout_shards: 1,
                history_size: 100,
                history_max_bytes: 1 << 20,
                dedup_window: Duration::from_secs(60),
                dedup_max_keys: 100,
                max_rooms: 10,
                max_pending: 4,
            },
            LogMode::Authoritative,
        );
        let r = RoomId::parse("r").unwrap();
        let plain = outbox();
        idx.join(&r, ConnId(1000), Member::Full(&plain), None).unwrap();
        let members: Vec<ConnOutbox> = (0..50).map(|_| outbox()).collect();
        for (i, ob) in members.iter().enumerate() {
            let member = Member::Deflated {
                outbox: ob,
                codec: Codec::Json,
            };
            idx.join(&r, ConnId(i as u64), member, None).unwrap();
        }
        assert_eq!(idx.members(&r), 51);
        let text = format!(r#"{{"text":"{}"}}"#, "hello chat room, ".repeat(12));
        let before = deflate::tests::compressions();
        idx.publish(&r, "alice", &Bytes::from(text.clone()), None, 1, Instant::now())
            .unwrap();
        assert_eq!(deflate::tests::compressions(), before + 1, "once for 50 members");

        let plain_frame = one_frame(&plain).await;
        assert!(!plain_frame.is_compressed());
        let mut shared = std::collections::HashSet::new();
        for ob in &members {
            let f = one_frame(ob).await;
            assert!(f.is_compressed());
            shared.insert(f.wire().as_ptr());
            let inflated = deflate::inflate(f.as_bytes(), 1 << 20).unwrap();
            assert_eq!(inflated, plain_frame.as_bytes());
        }
        assert_eq!(shared.len(), 1, "every compressed member holds the same bytes");
        assert!(!shared.contains(&plain_frame.wire().as_ptr()));

        // A joiner's catch-up is that same frame: nothing compressed anew.
        let joiner = outbox();
        let member = Member::Deflated {
            outbox: &joiner,
            codec: Codec::Json,
        };
        let j = idx.join(&r, ConnId(77), member, Some(0)).unwrap();
        let Some((1, Some(Catchup::Messages { messages, .. }))) = j.at else {
            panic!("{:?}", j.at);
        };
        let again = messages[0].deflated_frame(Codec::Json);
        assert!(shared.contains(&again.wire().as_ptr()));
        assert_eq!(deflate::tests::compressions(), before + 1);

        // Leaving: the compressed members' sets go with the last one.
        for i in 0..50 {
            idx.leave(&r, ConnId(i));
        }
        idx.leave(&r, ConnId(77));
        assert_eq!(idx.members(&r), 1);
        idx.with_existing(&r, |st| assert!(st.deflated.is_none())).unwrap();
    }
}
