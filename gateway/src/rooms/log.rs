//! The recent-message log of a room: publishing on this node (offsets and
//! per-user de-duplication), trimming to the caps, `since` catch-up and
//! `history` pages, and filling the cache from the stream (cluster mode).
//!
//! Does not own membership (`members`) nor the cluster's ordering
//! (`sequencer`).

use std::time::Instant;

use fanout_tree::Weighted;

use bytes::Bytes;

use super::{
    Catchup, Entry, HistoryPage, LogMode, Published, RoomError, RoomIndex, RoomLimits, RoomState, SharedMessage,
    dedup_key,
};
use crate::model::{Message, RoomId};

impl RoomState {
    pub(super) fn catchup(&self, since: u64, upto: u64) -> Catchup {
        if since >= upto {
            // Nothing missed, unless the client saw offsets this room never
            // had here (e.g. an embedded node restarted): it must reload.
            return Catchup::Messages {
                messages: Vec::new(),
                recovered: since == upto,
            };
        }
        if since >= self.evicted_upto {
            let start = self.log.partition_point(|e| e.offset <= since);
            let messages = self
                .log
                .range(start..)
                .take_while(|e| e.offset <= upto)
                .map(|e| e.msg.clone())
                .collect();
            return Catchup::Messages {
                messages,
                recovered: true,
            };
        }
        if since < self.gone_upto {
            return Catchup::Messages {
                messages: Vec::new(),
                recovered: false,
            };
        }
        Catchup::NeedsBackend
    }

    /// Whether the log holds every message the room still has.
    pub(super) fn complete(&self) -> bool {
        self.gone_upto == self.evicted_upto
    }

    /// Puts `entries` (oldest first), read from the stream, in front of the
    /// log as far as the caps allow. They must be every message of the room
    /// in `(covers_from, read_upto]`; unless that range reaches the log's
    /// start they are not contiguous with it and nothing is added.
    pub(super) fn prepend(
        &mut self,
        limits: &RoomLimits,
        covers_from: u64,
        entries: &[(u64, SharedMessage)],
        read_upto: u64,
    ) {
        let floor = self.evicted_upto;
        if !self.live || read_upto < floor || covers_from >= floor {
            return;
        }
        // Never claim what is known to be gone.
        let mut start = covers_from.max(self.gone_upto);
        for (offset, msg) in entries.iter().rev() {
            if *offset > floor {
                continue;
            }
            if *offset <= start {
                break;
            }
            let fits =
                self.log.len() < limits.history_size && self.log_bytes + msg.weight() <= limits.history_max_bytes;
            if !fits {
                start = *offset;
                break;
            }
            self.log_bytes += msg.weight();
            self.log.push_front(Entry {
                offset: *offset,
                msg: msg.clone(),
            });
        }
        self.evicted_upto = start;
    }
}

impl RoomIndex {
    /// The messages of `room` in `(since, upto]` as far as this node has them.
    /// A room that is not live yet (cache mode: its state exists while a
    /// member is being joined, or lingers after a join that failed) holds no
    /// cache to answer from.
    pub fn catchup(&self, room: &RoomId, since: u64, upto: u64) -> Catchup {
        self.with_existing(room, |st| {
            if st.live {
                st.catchup(since, upto)
            } else {
                Catchup::NeedsBackend
            }
        })
        .unwrap_or(Catchup::NeedsBackend)
    }

    /// Stores a message published on this node (the embedded bus) by `from`:
    /// assigns the next offset, remembers `key` for this user in this room,
    /// stores the message once (its JSON push encoded now), appends it to the
    /// log and offers it to every member.
    pub fn publish(
        &self,
        room: &RoomId,
        from: &str,
        data: &Bytes,
        key: Option<&str>,
        ts_ms: u64,
        now: Instant,
    ) -> Result<Published, RoomError> {
        // Keys are scoped to the user: clients number their keys alike, and
        // one user must never suppress another's message by guessing a key.
        let key = key.map(|k| dedup_key(from, k));
        let published = self.with_room(room, |st| {
            self.expire_keys(st, now);
            if let Some(offset) = key.as_deref().and_then(|k| st.dedup.get(k)) {
                return Published {
                    offset: *offset,
                    fresh: false,
                    delivered: 0,
                };
            }
            let offset = st.last_offset + 1;
            let msg = SharedMessage::new(Message {
                room: room.clone(),
                offset,
                ts: ts_ms,
                from: from.to_owned(),
                data: data.clone(),
            });
            if let Some(k) = key.as_deref() {
                let k: Box<str> = k.into();
                st.dedup.insert(k.clone(), offset);
                st.dedup_order.push_back((now, k));
                if st.dedup_order.len() > self.limits.dedup_max_keys
                    && let Some((_, old)) = st.dedup_order.pop_front()
                {
                    st.dedup.remove(&old);
                }
            }
            let delivered = self.append_and_broadcast(room, st, offset, msg);
            Published {
                offset,
                fresh: true,
                delivered,
            }
        });
        self.keep_budget();
        published
    }

    pub(super) fn expire_keys(&self, st: &mut RoomState, now: Instant) {
        while let Some((at, _)) = st.dedup_order.front() {
            if now.duration_since(*at) < self.limits.dedup_window {
                break;
            }
            if let Some((_, k)) = st.dedup_order.pop_front() {
                st.dedup.remove(&k);
            }
        }
    }

    pub(super) fn trim(&self, st: &mut RoomState) {
        while st.log.len() > self.limits.history_size
            || (st.log_bytes > self.limits.history_max_bytes && st.log.len() > 1)
        {
            if let Some(old) = st.log.pop_front() {
                st.log_bytes -= old.msg.weight();
                st.evicted_upto = old.offset;
                // Evicted from the authoritative log it is gone; evicted
                // from a cache, the stream still has it.
                if self.mode == LogMode::Authoritative {
                    st.gone_upto = old.offset;
                }
            }
        }
    }

    /// Where the cache of `room` starts (cache mode, live): it holds every
    /// message in `(start, last]`. Also returns the encoded bytes of its
    /// messages in `(start, upto]`, what a catch-up to `upto` takes from it.
    pub fn cache_start(&self, room: &RoomId, upto: u64) -> Option<(u64, usize)> {
        self.with_existing(room, |st| {
            st.live.then(|| {
                let bytes = st
                    .log
                    .iter()
                    .take_while(|e| e.offset <= upto)
                    .map(|e| e.msg.weight())
                    .sum();
                (st.evicted_upto, bytes)
            })
        })
        .flatten()
    }

    /// Puts messages read from the stream in front of the cache of `room`
    /// (cache mode) as far as its message and byte caps allow. `entries`
    /// (oldest first) must be every message of the room in
    /// `(covers_from, read_upto]`: when the message at `covers_from` is still
    /// stored nothing after it was dropped. Entries not contiguous with the
    /// cache (the cache now starts above `read_upto`) are not added.
    pub fn prepend(&self, room: &RoomId, covers_from: u64, entries: &[(u64, SharedMessage)], read_upto: u64) {
        self.with_existing(room, |st| {
            let before = st.log_bytes;
            st.prepend(&self.limits, covers_from, entries, read_upto);
            self.account(before, st.log_bytes);
        });
        self.keep_budget();
    }

    /// Completes a catch-up of `room` for `since` up to `upto` with `read`,
    /// every message of the room in `(since, read_upto]` read from the stream
    /// (oldest first), and the cache: the read messages up to where the cache
    /// starts, then the cache's. The read messages are also put in front of
    /// the cache as far as its caps allow. `None` when the room is not live
    /// and the read stops short of `upto`, or when the cache now starts above
    /// `read_upto` (read on from there).
    pub fn catchup_from_stream(
        &self,
        room: &RoomId,
        since: u64,
        upto: u64,
        read: &[(u64, SharedMessage)],
        read_upto: u64,
    ) -> Option<Vec<SharedMessage>> {
        let from_read = |end: u64| -> Vec<SharedMessage> {
            read.iter()
                .filter(|(offset, _)| *offset > since && *offset <= end)
                .map(|(_, msg)| msg.clone())
                .collect()
        };
        // Outer `None`: no live cache; inner `None`: not contiguous.
        let joined = self.with_existing(room, |st| {
            if !st.live {
                return None;
            }
            let floor = st.evicted_upto.min(upto);
            if read_upto < floor {
                return Some(None);
            }
            let mut messages = from_read(floor);
            let start = st.log.partition_point(|e| e.offset <= floor.max(since));
            messages.extend(
                st.log
                    .range(start..)
                    .take_while(|e| e.offset <= upto)
                    .map(|e| e.msg.clone()),
            );
            let before = st.log_bytes;
            st.prepend(&self.limits, since, read, read_upto);
            self.account(before, st.log_bytes);
            Some(Some(messages))
        });
        self.keep_budget();
        match joined.flatten() {
            Some(messages) => messages,
            // No cache: the read alone must reach `upto`.
            None => (read_upto >= upto).then(|| from_read(upto)),
        }
    }

    /// Up to `limit` messages older than `before` (all if `None`), oldest
    /// first, and whether older ones remain.
    pub fn history(&self, room: &RoomId, before: Option<u64>, limit: usize) -> HistoryPage {
        let empty = HistoryPage::Messages {
            messages: Vec::new(),
            more: false,
        };
        let Some(page) = self.with_existing(room, |st| {
            // Not live (cache mode): the state of a room being joined, or
            // lingering after a join that failed, caches nothing yet. An
            // empty log there once answered a page of nothing, `more:false`.
            if !st.live {
                return HistoryPage::NeedsBackend;
            }
            let end = match before {
                Some(b) => st.log.partition_point(|e| e.offset < b),
                None => st.log.len(),
            };
            let start = end.saturating_sub(limit);
            let covered = st.complete() || end - start == limit;
            if !covered {
                return HistoryPage::NeedsBackend;
            }
            let messages = st.log.range(start..end).map(|e| e.msg.clone()).collect();
            HistoryPage::Messages {
                messages,
                more: start > 0 || !st.complete(),
            }
        }) else {
            return if self.mode == LogMode::Authoritative {
                empty
            } else {
                HistoryPage::NeedsBackend
            };
        };
        page
    }
}
