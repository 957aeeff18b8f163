//! The node-wide bounds on room state: the bytes of stored history across
//! every room (`--history-total-bytes`) and the room count (`--max-rooms`).
//!
//! Each room's log is capped on its own (`--history-size`,
//! `--history-max-bytes`), but with the authoritative log (embedded mode) a
//! room that has history is never dropped when its last member leaves, so
//! without these bounds rooms created by publishes alone would hold memory
//! and room slots until the process ends, and once `--max-rooms` was reached
//! no one could create a room. Here:
//! - the node counts the encoded bytes of every room's log
//!   ([`RoomIndex::history_bytes`]); when a change takes it over
//!   `--history-total-bytes`, rooms' histories are dropped, least recently
//!   active first and rooms without local members before any with members,
//!   until it is at most 90% of the budget;
//! - a new room over `--max-rooms` first frees 1% of the slots (at least one)
//!   from rooms without members (embedded mode), least recently active first.
//!
//! A room without members whose history is dropped is removed once no
//! publish `key` of it is remembered (de-duplication keeps working within its
//! window). The offsets of a room made again start above every offset a
//! removed room reached ([`RoomIndex::offset_floor`]), so a client's `since`
//! from before is answered `recovered:false`, never with another room's
//! messages; a room whose history was dropped answers `since` from before the
//! drop the same way (cluster mode: the stream still has them and the
//! catch-up reads them there). Evictions count in
//! `gateway_history_evicted_rooms_total`.
//!
//! One shedding runs at a time: a byte shedding is skipped while another
//! runs (that one brings the total down), a slot search waits for it and
//! looks again. It reads the rooms' activity from their counters without
//! locks, then locks one room at a time (never while holding the room map's
//! guard). A slot search that freed nothing is not tried again for
//! [`RETRY_AFTER`]. It runs on the thread whose publish or join crossed the
//! bound: a walk of every room, amortized over the 10% of the budget or 1%
//! of the slots it frees.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::MutexGuard;

use super::{LogMode, RoomIndex, RoomState};

/// How long a `--max-rooms` refusal is answered without another search for
/// rooms to evict, after a search found none (every room has members).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a shedding is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// The stored history is over `--history-total-bytes`.
    Bytes,
    /// A new room is over `--max-rooms`.
    Slots,
}

impl RoomIndex {
    /// Encoded bytes of the stored history of every room on this node
    /// (`gateway_history_bytes`).
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Relaxed)
    }

    /// The first offset rooms made from now on start after (0 until a room
    /// with messages was removed; embedded mode).
    pub fn offset_floor(&self) -> u64 {
        self.offset_floor.load(Ordering::Relaxed)
    }

    /// Counts a change of one room's `log_bytes` from `before` to `after` in
    /// the node's total.
    pub(super) fn account(&self, before: usize, after: usize) {
        if after > before {
            self.history_bytes.fetch_add(after - before, Ordering::Relaxed);
        } else if before > after {
            self.history_bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Drops the stored history of a locked room (its offsets stay).
    pub(super) fn drop_history(&self, st: &mut RoomState) {
        let before = st.log_bytes;
        st.log.clear();
        st.log_bytes = 0;
        st.evicted_upto = st.evicted_upto.max(st.last_offset);
        // From a cache it is not gone: the stream still has it.
        if self.mode == LogMode::Authoritative {
            st.gone_upto = st.evicted_upto;
        }
        self.account(before, 0);
    }

    /// Brings the stored history back within `--history-total-bytes` if a
    /// change took it over. Call with no room lock held.
    pub(super) fn keep_budget(&self) {
        if self.history_bytes() > self.limits.history_total_bytes
            && let Some(running) = self.shedding.try_lock()
        {
            self.shed(Need::Bytes, running);
        }
    }

    /// Frees room slots for a new room over `--max-rooms` (embedded mode);
    /// whether one is free now. Call with no room lock held.
    pub(super) fn free_a_slot(&self) -> bool {
        if self.mode == LogMode::Authoritative {
            // After a shedding under way, which may have freed slots.
            let running = self.shedding.lock();
            let failed = *self.slot_search_failed.lock();
            if self.len() >= self.limits.max_rooms && failed.is_none_or(|at| at.elapsed() >= RETRY_AFTER) {
                self.shed(Need::Slots, running);
            }
        }
        self.len() < self.limits.max_rooms
    }

    /// Sheds for `need`; `_running` is the held `shedding` lock.
    fn shed(&self, need: Need, _running: MutexGuard<'_, ()>) {
        let bytes_target = self.limits.history_total_bytes / 10 * 9;
        let rooms_target = self.limits.max_rooms - (self.limits.max_rooms / 100).max(1);
        // The activity read without locks: rooms without members first,
        // then the least recently active.
        let mut rooms: Vec<_> = self
            .rooms
            .iter()
            .map(|e| {
                let s = &e.value().stats;
                let members = s.members.load(Ordering::Relaxed) > 0;
                let active = s.last_active_ms.load(Ordering::Relaxed);
                (members, active, e.key().clone(), e.value().clone())
            })
            .collect();
        rooms.sort_unstable_by_key(|(members, active, ..)| (*members, *active));
        let now = Instant::now();
        let (mut evicted, mut with_members) = (0u64, 0u64);
        for (had_members, _, id, room) in rooms {
            let more = match need {
                Need::Bytes => self.history_bytes() > bytes_target,
                Need::Slots => self.len() > rooms_target,
            };
            if !more {
                break;
            }
            let mut st = room.state.lock();
            if st.dead {
                continue;
            }
            let empty = !st.has_members();
            if need == Need::Bytes && st.log.is_empty() {
                // Nothing to free (a room just made is among these).
                continue;
            }
            if need == Need::Slots {
                if !empty {
                    if had_members {
                        // Rooms with members come last: none left to free.
                        break;
                    }
                    // Joined since, or held by a connection still joining.
                    continue;
                }
                if st.log.is_empty() && st.dedup.is_empty() {
                    // Just made by a publish or join not applied yet.
                    continue;
                }
                // Only a room that can go loses its history here: one whose
                // publish keys are still remembered keeps both.
                self.expire_keys(&mut st, now);
                if !st.dedup.is_empty() {
                    continue;
                }
            }
            if !st.log.is_empty() {
                self.drop_history(&mut st);
                evicted += 1;
                with_members += u64::from(!empty);
            }
            if empty && self.mode == LogMode::Authoritative {
                if need == Need::Bytes {
                    // (A slot search expired them above.)
                    self.expire_keys(&mut st, now);
                }
                if st.dedup.is_empty() {
                    self.remove_locked(&id, &mut st);
                }
            }
        }
        if evicted > 0 {
            metrics::counter!("gateway_history_evicted_rooms_total").increment(evicted);
        }
        if with_members > 0 {
            tracing::warn!(
                rooms = with_members,
                history_bytes = self.history_bytes(),
                budget = self.limits.history_total_bytes,
                "stored history over --history-total-bytes: rooms with members lost their history"
            );
        }
        if need == Need::Slots {
            *self.slot_search_failed.lock() = (self.len() >= self.limits.max_rooms).then(Instant::now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use fanout_tree::{Outbox, OutboxLimits};

    use super::super::{Catchup, ConnId, ConnOutbox, HistoryPage, LogMode, Member, RoomId, RoomIndex, RoomLimits};

    fn index(total: usize, max_rooms: usize) -> RoomIndex {
        RoomIndex::new(
            RoomLimits {
                fanout_shards: 1,
                tree: fanout_tree::TreeConfig::default(),
                history_size: 100,
                history_max_bytes: 1 << 20,
                history_total_bytes: total,
                dedup_window: std::time::Duration::from_secs(60),
                dedup_max_keys: 100,
                max_rooms,
                max_pending: 4,
            },
            LogMode::Authoritative,
        )
    }

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    fn publish(idx: &RoomIndex, r: &RoomId, key: Option<&str>) -> u64 {
        let data = Bytes::from(format!(r#"{{"text":"{}"}}"#, "x".repeat(200)));
        let now = std::time::Instant::now();
        idx.publish(r, "alice", &data, key, 0, now).unwrap().offset
    }

    fn stored(idx: &RoomIndex, r: &RoomId) -> usize {
        match idx.history(r, None, 100) {
            HistoryPage::Messages { messages, .. } => messages.len(),
            HistoryPage::NeedsBackend => 0,
        }
    }

    /// The node's count is the sum of the rooms' logs, over publishes,
    /// trims and removals.
    #[test]
    fn the_node_counts_every_rooms_history_bytes() {
        let idx = index(1 << 30, 100);
        let (a, b) = (room("a"), room("b"));
        publish(&idx, &a, None);
        let one = idx.history_bytes();
        assert!(one > 200, "{one}");
        publish(&idx, &a, None);
        publish(&idx, &b, None);
        assert_eq!(idx.history_bytes(), 3 * one);
        idx.lost_messages(&a, 2);
        assert_eq!(idx.history_bytes(), one, "a's log cleared");
    }

    /// Rooms' activity is read in milliseconds: a pause makes the order
    /// of two publishes certain.
    fn tick() {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }

    /// Over the budget, rooms without members lose their history first,
    /// least recently active first, down to 90% of the budget; a room with a
    /// member keeps its own while others can go.
    #[test]
    fn over_the_budget_idle_rooms_without_members_go_first() {
        let idx = index(10_000, 1000);
        let kept = room("kept");
        let ob: ConnOutbox = Arc::new(Outbox::new(OutboxLimits::default()));
        idx.join(&kept, ConnId(1), Member::Full(&ob), None, None).unwrap();
        publish(&idx, &kept, None);
        for i in 0..60 {
            tick();
            publish(&idx, &room(&format!("r{i}")), None);
            assert!(idx.history_bytes() <= 10_000, "{} after room {i}", idx.history_bytes());
        }
        assert_eq!(stored(&idx, &kept), 1, "the room with a member kept its history");
        assert_eq!(stored(&idx, &room("r59")), 1, "the newest room kept its history");
        assert_eq!(stored(&idx, &room("r0")), 0, "the oldest lost its history");
        assert!(
            idx.len() < 61,
            "rooms without members or keys were removed: {}",
            idx.len()
        );
    }

    /// `--max-rooms` full of rooms nobody is in: a new room frees a slot
    /// (the least recently active room) instead of being refused, and a room
    /// made again starts above every removed room's offsets, so an old
    /// `since` is `recovered:false`.
    #[test]
    fn a_new_room_over_max_rooms_evicts_a_room_without_members() {
        let idx = index(1 << 30, 10);
        for _ in 0..5 {
            publish(&idx, &room("old"), None);
        }
        for i in 0..9 {
            tick();
            publish(&idx, &room(&format!("r{i}")), None);
        }
        assert_eq!(idx.len(), 10);
        assert_eq!(idx.offset_floor(), 0);
        publish(&idx, &room("new"), None);
        assert_eq!(idx.len(), 10, "one room out, one in");
        assert_eq!(idx.offset_floor(), 5, "\"old\" went, at offset 5");
        assert_eq!(idx.last_offset(&room("r0")), 1, "the others stay");
        let again = publish(&idx, &room("old"), None);
        assert!(again > 5, "offset {again} after the removed room reached 5");
        let Catchup::Messages { recovered, .. } = idx.catchup(&room("old"), 3, again) else {
            panic!("the authoritative log answers");
        };
        assert!(!recovered, "a since from the removed room is not recovered");
    }

    /// A room whose publish keys are still remembered keeps its slot (a
    /// retry within the window must find its key), and with every room
    /// having members a new one is refused as before.
    #[test]
    fn rooms_with_members_or_remembered_keys_are_not_removed() {
        let idx = index(1 << 30, 2);
        let ob: ConnOutbox = Arc::new(Outbox::new(OutboxLimits::default()));
        idx.join(&room("a"), ConnId(1), Member::Full(&ob), None, None).unwrap();
        publish(&idx, &room("b"), Some("k1"));
        assert!(
            idx.publish(
                &room("c"),
                "alice",
                &Bytes::from("1"),
                None,
                0,
                std::time::Instant::now()
            )
            .is_err()
        );
        assert_eq!(stored(&idx, &room("b")), 1, "a room that cannot go keeps its history");
        assert_eq!(
            publish(&idx, &room("b"), Some("k1")),
            1,
            "the key still answers its offset"
        );
    }
}
