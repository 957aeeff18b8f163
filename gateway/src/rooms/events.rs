//! The room index as the broker sees it: [`RoomEvents`] and [`RoomCache`]
//! (defined by the broker, `broker/events.rs`) implemented by the methods of
//! `log`, `members` and `sequencer`. Each method forwards to the one of the
//! same name; their documentation is the contract.

use std::time::Instant;

use bytes::Bytes;

use super::{Catchup, Delivered, Gap, Published, RoomError, RoomIndex, SharedMessage};
use crate::broker::events::{RoomCache, RoomEvents};
use crate::model::RoomId;

impl RoomEvents for RoomIndex {
    fn publish(
        &self,
        room: &RoomId,
        from: &str,
        data: &Bytes,
        key: Option<&str>,
        ts_ms: u64,
        arrived: Instant,
    ) -> Result<Published, RoomError> {
        RoomIndex::publish(self, room, from, data, key, ts_ms, arrived)
    }

    fn deliver(&self, room: &RoomId, seq: u64, prev: u64, msg: SharedMessage) -> Delivered {
        RoomIndex::deliver(self, room, seq, prev, msg)
    }

    fn broadcast_unstored(&self, room: &RoomId, msg: &SharedMessage) -> usize {
        RoomIndex::broadcast_unstored(self, room, msg)
    }

    fn go_live(&self, room: &RoomId, last: u64) -> Option<Gap> {
        RoomIndex::go_live(self, room, last)
    }

    fn request_repair(&self, room: &RoomId, tail: u64) -> Option<Gap> {
        RoomIndex::request_repair(self, room, tail)
    }

    fn repaired(&self, room: &RoomId, fetched: Vec<(u64, SharedMessage)>, upto: u64) -> Option<Gap> {
        RoomIndex::repaired(self, room, fetched, upto)
    }

    fn repair_failed(&self, room: &RoomId) {
        RoomIndex::repair_failed(self, room);
    }

    fn lost_messages(&self, room: &RoomId, gone_upto: u64) -> usize {
        RoomIndex::lost_messages(self, room, gone_upto)
    }

    fn gap_unread(&self, room: &RoomId, upto: u64) -> usize {
        RoomIndex::gap_unread(self, room, upto)
    }

    fn forget_if_empty(&self, room: &RoomId) -> bool {
        RoomIndex::forget_if_empty(self, room)
    }
}

impl RoomCache for RoomIndex {
    fn is_live(&self, room: &RoomId) -> bool {
        RoomIndex::is_live(self, room)
    }

    fn last_offset(&self, room: &RoomId) -> u64 {
        RoomIndex::last_offset(self, room)
    }

    fn live_rooms(&self) -> Vec<(RoomId, u64)> {
        RoomIndex::live_rooms(self)
    }

    fn catchup(&self, room: &RoomId, since: u64, upto: u64) -> Catchup {
        RoomIndex::catchup(self, room, since, upto)
    }

    fn cache_start(&self, room: &RoomId, upto: u64) -> Option<(u64, usize)> {
        RoomIndex::cache_start(self, room, upto)
    }

    fn catchup_from_stream(
        &self,
        room: &RoomId,
        since: u64,
        upto: u64,
        read: &[(u64, SharedMessage)],
        read_upto: u64,
    ) -> Option<Vec<SharedMessage>> {
        RoomIndex::catchup_from_stream(self, room, since, upto, read, read_upto)
    }

    fn prepend(&self, room: &RoomId, covers_from: u64, entries: &[(u64, SharedMessage)], read_upto: u64) {
        RoomIndex::prepend(self, room, covers_from, entries, read_upto);
    }
}
