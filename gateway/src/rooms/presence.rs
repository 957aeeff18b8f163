//! What presence reads from the member sets: a room's local connection
//! count and, for small rooms, its members' connection ids, plus the list
//! of rooms whose membership changed since presence last looked.
//!
//! Presence keeps no index of its own: a join costs one flag test under the
//! room lock it already holds (and, once per room per presence interval,
//! one push onto the changed list). The user behind each connection is
//! looked up only when a small room's list is read.

use std::sync::atomic::Ordering;

use super::{ConnId, RoomId, RoomIndex, RoomState};

/// A room's local membership as presence reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPresence {
    /// Connections subscribed on this node, in any mode (not those still
    /// joining).
    pub count: u32,
    /// Their connection ids, when `count` is within the asked bound.
    pub conns: Option<Vec<ConnId>>,
}

impl RoomIndex {
    /// Starts (or stops) recording which rooms' membership changed, for
    /// [`RoomIndex::take_presence_changes`]. Off by default: a node that
    /// sends no presence summaries records nothing.
    pub fn track_presence(&self, on: bool) {
        self.presence_tracked.store(on, Ordering::Relaxed);
    }

    /// Called under the room lock after a membership change.
    pub(super) fn presence_note(&self, room: &RoomId, st: &mut RoomState) {
        if !st.presence_changed && self.presence_tracked.load(Ordering::Relaxed) {
            st.presence_changed = true;
            self.presence_changed.lock().push(room.clone());
        }
    }

    /// Puts `room` on the changed list as if its membership had changed
    /// (another gateway started watching it and needs this node's list).
    pub fn presence_touch(&self, room: &RoomId) {
        self.with_existing(room, |st| self.presence_note(room, st));
    }

    /// The rooms whose membership changed since the previous call, each
    /// once; reading one with [`RoomIndex::presence`] and `clear` re-arms
    /// it.
    pub fn take_presence_changes(&self) -> Vec<RoomId> {
        std::mem::take(&mut *self.presence_changed.lock())
    }

    /// Every room with state on this node (a full presence summary).
    pub fn room_ids(&self) -> Vec<RoomId> {
        self.rooms.iter().map(|e| e.key().clone()).collect()
    }

    /// `room`'s local membership, with the connection ids when there are at
    /// most `list_max`; `clear` marks the room as read for the changed list.
    /// A room without state has count 0 and an empty list.
    pub fn presence(&self, room: &RoomId, list_max: usize, clear: bool) -> LocalPresence {
        self.with_existing(room, |st| {
            if clear {
                st.presence_changed = false;
            }
            let count = st.full_len() + st.watchers.len();
            let conns = (count <= list_max).then(|| st.member_ids().collect());
            LocalPresence {
                count: u32::try_from(count).unwrap_or(u32::MAX),
                conns,
            }
        })
        .unwrap_or(LocalPresence {
            count: 0,
            conns: Some(Vec::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fanout_tree::{Outbox, OutboxLimits};

    use super::super::Member;
    use super::super::tests::index;
    use super::*;

    #[test]
    fn changes_are_listed_once_per_read_and_counts_follow_the_member_sets() {
        let idx = index(10);
        let room = RoomId::parse("general").unwrap();
        let ob = Arc::new(Outbox::new(OutboxLimits::default()));
        // Not tracked: nothing recorded.
        let j = idx.join(&room, ConnId(1), Member::Full(&ob), None, None).unwrap();
        assert!(idx.take_presence_changes().is_empty());
        idx.track_presence(true);
        let j2 = idx.join(&room, ConnId(2), Member::Full(&ob), None, None).unwrap();
        let j3 = idx.join(&room, ConnId(3), Member::FullProto(&ob), None, None).unwrap();
        assert_eq!(idx.take_presence_changes(), vec![room.clone()]);
        let p = idx.presence(&room, 10, true);
        assert_eq!(p.count, 3);
        let mut conns = p.conns.unwrap();
        conns.sort_by_key(|c| c.0);
        assert_eq!(conns, vec![ConnId(1), ConnId(2), ConnId(3)]);
        assert_eq!(idx.presence(&room, 2, false).conns, None, "over the bound: no list");
        // Read: the next change lists the room again.
        idx.leave(&room, ConnId(1), j.slot);
        assert_eq!(idx.take_presence_changes(), vec![room.clone()]);
        idx.presence(&room, 10, true);
        idx.leave(&room, ConnId(2), j2.slot);
        idx.leave(&room, ConnId(3), j3.slot);
        assert_eq!(idx.take_presence_changes(), vec![room.clone()]);
        let gone = idx.presence(&room, 10, true);
        assert_eq!((gone.count, gone.conns), (0, Some(vec![])));
    }
}
