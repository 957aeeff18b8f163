//! Cluster mode: a room's messages arrive from the broker with their stream
//! offsets; the sequencer applies them in order, buffers what arrives ahead
//! of a gap or before the room is live, and tells the broker which gap to
//! read. The broker reads; the sequencer only decides.

use super::{Delivered, Gap, RoomIndex, RoomState, SharedMessage};
use crate::model::RoomId;

impl RoomIndex {
    /// A message from the bus with its offset `seq`; `prev` is the previous
    /// offset of the same room (0 if unknown).
    pub fn deliver(&self, room: &RoomId, seq: u64, prev: u64, msg: SharedMessage) -> Delivered {
        let delivered = self
            .with_existing(room, |st| {
                if !st.live || st.repairing {
                    if st.live && seq <= st.last_offset {
                        return Delivered::Duplicate;
                    }
                    self.buffer(st, seq, prev, msg);
                    return Delivered::Buffered;
                }
                if seq <= st.last_offset {
                    return Delivered::Duplicate;
                }
                // An unknown previous offset (0 while the room has messages) may
                // hide a gap: read up to the message before this one to be sure.
                let prev = if prev == 0 && st.last_offset > 0 { seq - 1 } else { prev };
                if prev > st.last_offset {
                    let gap = Gap {
                        after: st.last_offset,
                        upto: prev,
                    };
                    self.buffer(st, seq, prev, msg);
                    st.repairing = true;
                    return Delivered::Gap(gap);
                }
                let members = self.append_and_broadcast(room, st, seq, msg);
                Delivered::Applied { members }
            })
            .unwrap_or(Delivered::NoRoom);
        self.keep_budget();
        delivered
    }

    pub(super) fn buffer(&self, st: &mut RoomState, seq: u64, prev: u64, msg: SharedMessage) {
        st.pending.insert(seq, (prev, msg));
        while st.pending.len() > self.limits.max_pending {
            if let Some((dropped, _)) = st.pending.pop_first() {
                st.pending_dropped = st.pending_dropped.max(dropped);
            }
        }
    }

    /// Applies buffered messages that now follow on; returns the next gap:
    /// up to the previous offset of the first message still waiting, or, with
    /// nothing waiting, up to a tail learnt from the stream or a publish ack.
    pub(super) fn drain_pending(&self, room: &RoomId, st: &mut RoomState) -> Option<Gap> {
        while let Some(entry) = st.pending.first_entry() {
            let seq = *entry.key();
            let prev = entry.get().0;
            if seq <= st.last_offset {
                entry.remove();
                continue;
            }
            let prev = if prev == 0 && st.last_offset > 0 { seq - 1 } else { prev };
            if prev > st.last_offset {
                st.repairing = true;
                return Some(Gap {
                    after: st.last_offset,
                    upto: prev,
                });
            }
            let (_, msg) = entry.remove();
            self.append_and_broadcast(room, st, seq, msg);
        }
        if st.pending_dropped > st.last_offset {
            st.repairing = true;
            return Some(Gap {
                after: st.last_offset,
                upto: st.pending_dropped,
            });
        }
        st.pending_dropped = 0;
        st.repairing = false;
        None
    }

    /// Messages of `room` up to `gone_upto` were lost for this node (the
    /// stream dropped them before this node could read them): every local
    /// member is closed as a slow consumer, so it reconnects with `since` and
    /// learns `recovered:false`, and the cache restarts after the hole so it
    /// never claims to cover it. Returns how many members were closed.
    pub fn lost_messages(&self, room: &RoomId, gone_upto: u64) -> usize {
        self.reset_after(room, gone_upto, true)
    }

    /// A gap of `room` up to `upto` could not be read from the stream (the
    /// broker gave up): like [`Self::lost_messages`], every local member is
    /// closed and the cache restarts after the gap, but nothing is claimed
    /// gone: a member resuming with an older `since` is answered from the
    /// stream, which proves or disproves the loss. Returns the members
    /// closed.
    pub fn gap_unread(&self, room: &RoomId, upto: u64) -> usize {
        self.reset_after(room, upto, false)
    }

    fn reset_after(&self, room: &RoomId, upto: u64, gone: bool) -> usize {
        self.with_existing(room, |st| {
            self.account(st.log_bytes, 0);
            st.log.clear();
            st.log_bytes = 0;
            st.evicted_upto = upto.max(st.evicted_upto);
            if gone {
                st.gone_upto = st.evicted_upto;
            }
            st.abort_full()
        })
        .unwrap_or(0)
    }

    /// Makes `room` live at offset `last` (cache mode): applies what was
    /// buffered meanwhile. Returns a gap to fetch, if any.
    pub fn go_live(&self, room: &RoomId, last: u64) -> Option<Gap> {
        let gap = self
            .with_existing(room, |st| {
                if st.live {
                    return None;
                }
                st.live = true;
                st.live_from = last;
                st.last_offset = last;
                st.evicted_upto = last;
                self.drain_pending(room, st)
            })
            .flatten();
        self.keep_budget();
        gap
    }

    /// Applies messages fetched for a gap (in offset order), then what was
    /// buffered behind it. Returns the next gap, if any.
    pub fn repaired(&self, room: &RoomId, fetched: Vec<(u64, SharedMessage)>, upto: u64) -> Option<Gap> {
        let gap = self
            .with_existing(room, |st| {
                for (seq, msg) in fetched {
                    if seq > st.last_offset {
                        self.append_and_broadcast(room, st, seq, msg);
                    }
                }
                // Whatever the gap held that the stream no longer has is skipped.
                if upto > st.last_offset {
                    st.last_offset = upto;
                }
                self.drain_pending(room, st)
            })
            .flatten();
        self.keep_budget();
        gap
    }

    /// Asks for the messages up to `tail` (the stream's last offset, or one
    /// acknowledged to a publisher here). Returns the gap to fetch now, or
    /// `None` if there is none or a repair under way will reach `tail`.
    pub fn request_repair(&self, room: &RoomId, tail: u64) -> Option<Gap> {
        self.with_existing(room, |st| {
            if tail <= st.last_offset {
                return None;
            }
            if !st.live || st.repairing {
                st.pending_dropped = st.pending_dropped.max(tail);
                return None;
            }
            st.repairing = true;
            Some(Gap {
                after: st.last_offset,
                upto: tail,
            })
        })
        .flatten()
    }

    /// Ends a repair that could not run (the bus is down); the next message
    /// or reconnect starts another.
    pub fn repair_failed(&self, room: &RoomId) {
        self.with_existing(room, |st| st.repairing = false);
    }
}
