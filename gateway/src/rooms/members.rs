//! How a room's members follow it, and the broadcast that offers a message
//! to all of them.
//!
//! Owns the member kinds ([`Member`]), the pending `activity` counts of
//! notify-mode members ([`Activity`]) and the broadcast step of a room's
//! state. Does not own the log (`log`) nor ordering (`sequencer`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use fanout_tree::Slot;
use fanout_tree::{Outbox, Weighted};
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
    /// Only coalesced `activity` pushes (`mode: notify`, background rooms).
    Notify(&'a Arc<Activity>),
    /// Holds the room (its state, its bus subscription) while the connection
    /// waits on the broker before it really joins; receives nothing. Joining
    /// again in another mode replaces it, under the same lock that reads the
    /// joiner's offset and catch-up.
    Joining,
}

/// Where a connection's full membership sits in a room: the slot in the
/// room's member set of its codec (the top bit marks `gw.v1.proto`). The
/// connection keeps it per room and hands it back to leave or switch modes,
/// so a room needs no index from connection to member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSlot(std::num::NonZeroU32);

impl MemberSlot {
    const PROTO: u32 = 1 << 31;

    /// The slot plus one (so an `Option<MemberSlot>` is 4 bytes), with the
    /// codec's bit.
    fn new(slot: Slot, proto: bool) -> Self {
        let raw = (slot.get() + 1) & !Self::PROTO;
        let raw = if proto { raw | Self::PROTO } else { raw };
        Self(std::num::NonZeroU32::new(raw).unwrap_or(std::num::NonZeroU32::MIN))
    }

    pub(super) fn json(slot: Slot) -> Self {
        Self::new(slot, false)
    }

    pub(super) fn proto(slot: Slot) -> Self {
        Self::new(slot, true)
    }

    /// Whether the slot is in the `gw.v1.proto` member set.
    pub(super) fn is_proto(self) -> bool {
        self.0.get() & Self::PROTO != 0
    }

    /// The slot within its member set.
    pub(super) fn slot(self) -> Slot {
        Slot::from_raw((self.0.get() & !Self::PROTO) - 1)
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
    /// protobuf members), and hands the outboxes that need writing to the
    /// flushers. A codec's members above `--tree-threshold` are split into
    /// shards that queue and write on all worker threads ([`fanout_tree::tree`]):
    /// then this only hands the frame to each shard.
    pub(super) fn broadcast(&self, st: &mut RoomState, msg: &SharedMessage, slow: &mut Vec<ConnId>) -> usize {
        // One list per thread, reused: no allocation per message.
        thread_local! {
            static SCHEDULE: RefCell<Vec<Arc<Outbox<Frame>>>> = const { RefCell::new(Vec::new()) };
        }
        SCHEDULE.with_borrow_mut(|schedule| {
            let mut delivered = 0;
            if !st.members.is_empty() {
                delivered += st
                    .members
                    .broadcast_tiered(msg.frame(Codec::Json), &self.tree, slow, schedule);
            }
            if !st.proto_members.is_empty() {
                delivered += st
                    .proto_members
                    .broadcast_tiered(msg.frame(Codec::Proto), &self.tree, slow, schedule);
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
