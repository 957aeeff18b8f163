//! How a room's members follow it, and the broadcast that offers a message
//! to all of them.
//!
//! Owns the member kinds ([`Member`]), the pending `activity` counts of
//! notify-mode members ([`Activity`]) and the broadcast step of a room's
//! state. Does not own the log (`log`) nor ordering (`sequencer`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use fanout_tree::{MemberSet, Slot, Weighted};
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

/// Where a connection's full membership sits in a room: the slot in one of
/// the room's member sets (the top two bits name the `FullSet`). The
/// connection keeps it per room and hands it back to leave or switch modes,
/// so a room needs no index from connection to member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSlot(std::num::NonZeroU32);

/// The member sets of a room that get every message: one per codec, and one
/// per codec for members that negotiated `permessage-deflate`. The value is
/// the set's index in [`RoomState::full_sets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FullSet {
    Json = 0,
    Proto = 1,
    DeflatedJson = 2,
    DeflatedProto = 3,
}

impl FullSet {
    /// Every set, in index order.
    const ALL: [FullSet; 4] = [
        FullSet::Json,
        FullSet::Proto,
        FullSet::DeflatedJson,
        FullSet::DeflatedProto,
    ];

    /// The frame of `msg` this set's members get.
    fn frame(self, msg: &SharedMessage) -> &Frame {
        match self {
            FullSet::Json => msg.frame(Codec::Json),
            FullSet::Proto => msg.frame(Codec::Proto),
            FullSet::DeflatedJson => msg.deflated_frame(Codec::Json),
            FullSet::DeflatedProto => msg.deflated_frame(Codec::Proto),
        }
    }
}

impl MemberSlot {
    /// The set, in the top two bits.
    const SHIFT: u32 = 30;
    const SLOT: u32 = (1 << Self::SHIFT) - 1;

    /// The slot plus one (so an `Option<MemberSlot>` is 4 bytes) in the low
    /// 30 bits, with the set above.
    pub(super) fn new(set: FullSet, slot: Slot) -> Self {
        let raw = ((slot.get() + 1) & Self::SLOT) | ((set as u32) << Self::SHIFT);
        Self(std::num::NonZeroU32::new(raw).unwrap_or(std::num::NonZeroU32::MIN))
    }

    /// The member set the slot is in.
    pub(super) fn set(self) -> FullSet {
        FullSet::ALL[(self.0.get() >> Self::SHIFT) as usize]
    }

    /// The slot within its member set.
    pub(super) fn slot(self) -> Slot {
        Slot::from_raw((self.0.get() & Self::SLOT).wrapping_sub(1))
    }
}

impl Member<'_> {
    /// The member set of a full membership (JSON for the other kinds).
    pub(super) fn full_set(&self) -> FullSet {
        match self {
            Member::FullProto(_) => FullSet::Proto,
            Member::Deflated { codec: Codec::Json, .. } => FullSet::DeflatedJson,
            Member::Deflated {
                codec: Codec::Proto, ..
            } => FullSet::DeflatedProto,
            _ => FullSet::Json,
        }
    }

    /// The frame of `msg` this member gets, the one its member set shares
    /// (also what its catch-up is made of).
    pub fn frame<'m>(&self, msg: &'m SharedMessage) -> &'m Frame {
        self.full_set().frame(msg)
    }
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

impl RoomState {
    /// The member sets that exist, with their names, in [`FullSet`] order
    /// (the compressed ones only while they have members).
    fn full_sets(&self) -> impl Iterator<Item = (FullSet, &MemberSet<ConnId, Frame>)> {
        let deflated = self.deflated.iter().flat_map(|d| d.iter());
        FullSet::ALL.into_iter().zip(self.plain.iter().chain(deflated))
    }

    /// [`RoomState::full_sets`], to change them.
    fn full_sets_mut(&mut self) -> impl Iterator<Item = (FullSet, &mut MemberSet<ConnId, Frame>)> {
        let deflated = self.deflated.iter_mut().flat_map(|d| d.iter_mut());
        FullSet::ALL.into_iter().zip(self.plain.iter_mut().chain(deflated))
    }

    /// The member set `set`, if it exists.
    fn full_set_mut(&mut self, set: FullSet) -> Option<&mut MemberSet<ConnId, Frame>> {
        self.full_sets_mut().nth(set as usize).map(|(_, members)| members)
    }

    /// Removes `conn`'s full membership at `held`; false if it was not
    /// there. The compressed members' sets go once the last one left.
    pub(super) fn stop_full(&mut self, conn: ConnId, held: Option<MemberSlot>) -> bool {
        let Some(m) = held else {
            return false;
        };
        let removed = self
            .full_set_mut(m.set())
            .is_some_and(|members| members.remove(m.slot(), conn));
        if let Some(d) = &self.deflated
            && d.iter().all(MemberSet::is_empty)
        {
            self.deflated = None;
        }
        removed
    }

    /// Adds `conn` as a full member of `set` unless `held` is already its
    /// slot there; returns its slot.
    pub(super) fn start_full(
        &mut self,
        conn: ConnId,
        outbox: &ConnOutbox,
        set: FullSet,
        held: Option<MemberSlot>,
    ) -> MemberSlot {
        if let Some(m) = held {
            if m.set() == set && self.full_set_mut(set).is_some_and(|s| s.holds(m.slot(), conn)) {
                return m;
            }
            self.stop_full(conn, Some(m));
        }
        if set as usize >= self.plain.len() {
            self.deflated.get_or_insert_default();
        }
        let members = self.full_set_mut(set).expect("made above");
        MemberSlot::new(set, members.insert(conn, outbox.clone()))
    }

    /// Members that get every message, of every kind.
    /// Every connection subscribed, in any mode, not those still joining.
    pub(super) fn member_ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.full_sets()
            .flat_map(|(_, set)| set.keys())
            .chain(self.watchers.keys().copied())
    }

    pub(super) fn full_len(&self) -> usize {
        self.full_sets().map(|(_, members)| members.len()).sum()
    }

    /// Closes every member that gets every message as a slow consumer;
    /// returns how many.
    pub(super) fn abort_full(&self) -> usize {
        self.full_sets().map(|(_, members)| members.abort_all()).sum()
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
        let before = st.log_bytes;
        st.log_bytes += msg.weight();
        st.log.push_back(Entry {
            offset,
            msg: msg.clone(),
        });
        self.trim(st);
        self.account(before, st.log_bytes);
        let delivered = self.broadcast(st, &msg);
        for w in st.watchers.values() {
            w.bump(room, offset);
        }
        let delivered = delivered + st.watchers.len();
        st.stats.record(delivered);
        delivered
    }

    /// Offers `msg` to the room's members, each set's frame shared by all
    /// of its members (the protobuf one made on the first broadcast that has
    /// protobuf members, a compressed one on the first with compressed
    /// members), and hands the outboxes that need writing to the flushers.
    /// A set's members above `--tree-threshold` are split into shards that
    /// queue and write on all worker threads ([`fanout_tree::tree`]): then
    /// this only hands the frame to each shard. Members whose outbox is full
    /// are not listed: their writers close them as slow consumers.
    pub(super) fn broadcast(&self, st: &mut RoomState, msg: &SharedMessage) -> usize {
        // One pair of lists per thread, reused: no allocation per message.
        thread_local! {
            static SCRATCH: RefCell<(Vec<ConnId>, Vec<ConnOutbox>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        }
        SCRATCH.with_borrow_mut(|(slow, schedule)| {
            let mut delivered = 0;
            for (set, members) in st.full_sets_mut() {
                if !members.is_empty() {
                    delivered += members.broadcast_tiered(set.frame(msg), &self.tree, slow, schedule);
                }
            }
            slow.clear();
            self.flushers.schedule(schedule);
            if schedule.capacity() > 1 << 16 {
                *schedule = Vec::new();
            }
            if slow.capacity() > 1 << 16 {
                *slow = Vec::new();
            }
            delivered
        })
    }

    /// Broadcasts a message that is not stored (ephemeral rooms).
    pub fn broadcast_unstored(&self, room: &RoomId, msg: &SharedMessage) -> usize {
        self.with_existing(room, |st| {
            for w in st.watchers.values() {
                w.bump(room, 0);
            }
            let delivered = self.broadcast(st, msg) + st.watchers.len();
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
    use fanout_tree::{Drained, Outbox, OutboxLimits};

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

    /// One connection moving through all four member sets with the slot it
    /// holds stays one membership, gets each message once in the set's
    /// frame, and a lost-message abort reaches members of every set.
    #[tokio::test]
    async fn a_connection_switches_between_all_four_sets_as_one_membership() {
        let idx = RoomIndex::new(
            RoomLimits {
                fanout_shards: 1,
                history_size: 100,
                history_max_bytes: 1 << 20,
                history_total_bytes: 1 << 30,
                dedup_window: Duration::from_secs(60),
                dedup_max_keys: 100,
                max_rooms: 10,
                max_pending: 4,
                tree: fanout_tree::TreeConfig::default(),
            },
            LogMode::Authoritative,
        );
        let r = RoomId::parse("r").unwrap();
        let ob = outbox();
        let text = Bytes::from(format!(r#"{{"text":"{}"}}"#, "switching sets, ".repeat(12)));
        let mut held = None;
        let kinds = [
            Member::Deflated {
                outbox: &ob,
                codec: Codec::Proto,
            },
            Member::Full(&ob),
            Member::Deflated {
                outbox: &ob,
                codec: Codec::Json,
            },
            Member::FullProto(&ob),
        ];
        for (i, member) in kinds.into_iter().enumerate() {
            let set = member.full_set();
            let j = idx.join(&r, ConnId(1), member, None, held).unwrap();
            let slot = j.slot.expect("a full membership");
            assert_eq!(slot.set(), set);
            held = Some(slot);
            assert_eq!(idx.members(&r), 1, "{set:?}: one membership");
            let p = idx.publish(&r, "a", &text, None, 1, Instant::now()).unwrap();
            assert_eq!(p.delivered, 1);
            let f = one_frame(&ob).await;
            let deflated = matches!(set, FullSet::DeflatedJson | FullSet::DeflatedProto);
            assert_eq!(f.is_compressed(), deflated, "{set:?}");
            let proto = matches!(set, FullSet::Proto | FullSet::DeflatedProto);
            let plain = if deflated {
                deflate::inflate(f.as_bytes(), 1 << 20).unwrap()
            } else {
                f.as_bytes().to_vec()
            };
            assert_eq!(plain.first() == Some(&b'{'), !proto, "{set:?}: the set's codec");
            idx.with_existing(&r, |st| assert_eq!(st.deflated.is_some(), deflated, "step {i}"))
                .unwrap();
        }
        // One member in each set: a loss closes all four.
        let others: Vec<ConnOutbox> = (0..3).map(|_| outbox()).collect();
        let members = [
            Member::Full(&others[0]),
            Member::Deflated {
                outbox: &others[1],
                codec: Codec::Json,
            },
            Member::Deflated {
                outbox: &others[2],
                codec: Codec::Proto,
            },
        ];
        for (i, member) in members.into_iter().enumerate() {
            idx.join(&r, ConnId(2 + i as u64), member, None, None).unwrap();
        }
        assert_eq!(idx.lost_messages(&r, 10), 4);
        assert!(ob.is_overflowed() && others.iter().all(|o| o.is_overflowed()));
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
                history_total_bytes: 1 << 30,
                dedup_window: Duration::from_secs(60),
                dedup_max_keys: 100,
                max_rooms: 10,
                max_pending: 4,
                tree: fanout_tree::TreeConfig::default(),
            },
            LogMode::Authoritative,
        );
        let r = RoomId::parse("r").unwrap();
        let plain = outbox();
        idx.join(&r, ConnId(1000), Member::Full(&plain), None, None).unwrap();
        let members: Vec<ConnOutbox> = (0..50).map(|_| outbox()).collect();
        let mut slots = Vec::new();
        for (i, ob) in members.iter().enumerate() {
            let member = Member::Deflated {
                outbox: ob,
                codec: Codec::Json,
            };
            slots.push(idx.join(&r, ConnId(i as u64), member, None, None).unwrap().slot);
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
        let j = idx.join(&r, ConnId(77), member, Some(0), None).unwrap();
        let Some((1, Some(Catchup::Messages { messages, .. }))) = j.at else {
            panic!("{:?}", j.at);
        };
        let again = messages[0].deflated_frame(Codec::Json);
        assert!(shared.contains(&again.wire().as_ptr()));
        assert_eq!(deflate::tests::compressions(), before + 1);

        // Leaving: the compressed members' sets go with the last one.
        for (i, slot) in slots.iter().enumerate() {
            idx.leave(&r, ConnId(i as u64), *slot);
        }
        idx.leave(&r, ConnId(77), j.slot);
        assert_eq!(idx.members(&r), 1);
        idx.with_existing(&r, |st| assert!(st.deflated.is_none())).unwrap();
    }
}
